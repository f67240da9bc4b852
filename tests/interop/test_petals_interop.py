"""jaxseq against a real Petals 2.2: a jaxseq client through Petals servers, a mixed swarm with a
SIGKILL, and a Petals client through jaxseq servers. Every comparison is with a local computation."""

from __future__ import annotations

import jax
import pytest

import jaxseq
from jaxseq import RemoteSequenceManager
from jaxseq.testing.launch import ServerProcess

from helpers import assert_matches, random_inputs, rel_err, training_step
from petals_helpers import petals_client_fwd_bwd, petals_server, write_tiny_checkpoint_with_petals_venv

pytestmark = [pytest.mark.petals, pytest.mark.network]
TOL = 1e-5
CLIENT = dict(min_backoff=0.2, max_backoff=1.0, request_timeout=30.0, ban_timeout=10.0, deadline=120.0)


@pytest.fixture(scope="module")
def petals_checkpoint(petals_py, tmp_path_factory):
    """8 blocks written by the Petals venv's transformers 4.34 (config with top-level rope_theta), loaded by jaxseq.

    Petals servers compute with torch and jaxseq's reference with XLA, so float32 rounding differs;
    init_std 0.1 makes every block change its input a lot (checked below) while keeping the
    8-block gradients well-conditioned enough for that rounding to stay under 1e-5.
    """
    path = write_tiny_checkpoint_with_petals_venv(
        petals_py, tmp_path_factory.mktemp("petals") / "llama",
        hidden=64, layers=8, heads=4, kv_heads=2, intermediate=128, vocab=100, init_std=0.1,
    )  # fmt: skip
    cfg, params = jaxseq.load_checkpoint(path)
    x = jax.random.normal(jax.random.key(0), (1, 8, cfg.hidden_size))
    assert rel_err(jaxseq.local_sequential(cfg, params, x, end=1), x) > 0.3  # blocks matter
    return path, cfg, params


@pytest.fixture
def jaxseq_servers():
    started: list[ServerProcess] = []

    def start(checkpoint, blocks, prefix, peers):
        server = ServerProcess(str(checkpoint), blocks, prefix, peers, ["--throughput", "1.0"]).wait_ready()
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def test_jaxseq_client_through_petals_servers(petals_py, petals_checkpoint, tmp_path):
    path, cfg, params = petals_checkpoint
    local = training_step(lambda x, p: jaxseq.local_sequential(cfg, params, x, p))
    with (
        petals_server(petals_py, path, block_indices="0:4", dht_prefix="interop1", log_dir=tmp_path) as first,
        petals_server(
            petals_py, path, block_indices="4:8", dht_prefix="interop1", initial_peers=[first.maddr], log_dir=tmp_path
        ) as second,
    ):
        config = jaxseq.ClientConfig(max_tokens_in_batch=8192, **CLIENT)
        with RemoteSequenceManager([first.maddr], "interop1", config) as manager:
            assert manager.num_blocks == 8  # from the Petals servers' _petals.models record
            step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
            for batch, seq, prompt_len in [(2, 7, 3), (8, 1024, 16)]:  # the second is 2 MiB: streamed both ways
                x, prompts = random_inputs(cfg, batch, seq, prompt_len)
                assert_matches(step(x, prompts), local(x, prompts))
            routes = {(r.peer, r.start, r.end) for r in manager.records}
            assert routes == {(first.peer_id, 0, 4), (second.peer_id, 4, 8)}
        log = first.log_tail(400) + second.log_tail(400)
        assert "rpc_forward_stream" in log and "rpc_backward_stream" in log


def test_mixed_swarm_and_sigkill_of_the_petals_server(petals_py, petals_checkpoint, jaxseq_servers, tmp_path):
    path, cfg, params = petals_checkpoint
    local = training_step(lambda x, p: jaxseq.local_sequential(cfg, params, x, p))
    with petals_server(petals_py, path, block_indices="0:4", dht_prefix="interop2", log_dir=tmp_path) as petals:
        ours = jaxseq_servers(path, (4, 8), "interop2", [petals.maddr])
        # A long update period: the client learns of the 0:8 server only when the Petals server fails.
        config = jaxseq.ClientConfig(update_period=600.0, **CLIENT)
        with RemoteSequenceManager([petals.maddr], "interop2", config) as manager:
            step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
            assert [(s.peer, s.start, s.end) for s in manager.make_route(0, 8)] == [
                (petals.peer_id, 0, 4),
                (ours.peer_id, 4, 8),
            ]
            x, prompts = random_inputs(cfg, 3, 10, 2)
            assert_matches(step(x, prompts), local(x, prompts))
            backup = jaxseq_servers(path, (0, 8), "interop2", [ours.maddr])
            petals.process.send_signal(9)  # SIGKILL the Petals server mid-training
            for i in range(3):
                p = prompts * (1 + 0.1 * i)
                assert_matches(step(x, p), local(x, p))
            assert manager.retries >= 1
            assert any(r.peer == backup.peer_id for r in manager.records)


def test_petals_client_through_jaxseq_servers(petals_py, petals_checkpoint, jaxseq_servers):
    path, _, _ = petals_checkpoint
    first = jaxseq_servers(path, (0, 4), "interop3", None)
    jaxseq_servers(path, (4, 8), "interop3", [first.maddr])
    result = petals_client_fwd_bwd(petals_py, path, [first.maddr], dht_prefix="interop3", batch=3, seq=12)
    assert result["first_block_change"] > 0.3, result  # blocks matter
    for key in ("rel_logits", "rel_grad_inputs_embeds", "rel_grad_lm_head", "rel_grad_norm"):
        assert result[key] < TOL, (key, result)
