"""jaxseq against a real Petals 2.2: a jaxseq client through Petals servers, a mixed swarm with a
SIGKILL, and a Petals client through jaxseq servers. Every comparison is with a local computation."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import jax
import numpy as np
import pytest
import torch
import transformers

import jaxseq
from jaxseq import RemoteSequenceManager
from jaxseq.models.lora import load_adapter, random_adapter, random_lora_weights, with_adapter
from jaxseq.testing.launch import ServerProcess

from helpers import assert_matches, random_inputs, rel_err, training_step
from petals_helpers import (
    petals_client_fwd_bwd,
    petals_client_generate,
    petals_server,
    write_tiny_checkpoint_with_petals_venv,
)

pytestmark = [pytest.mark.petals, pytest.mark.network]
TOL = 1e-5
IDS = [[5, 17, 3, 42, 8], [9, 1, 77, 23, 4]]  # prompts for generation
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


@contextlib.contextmanager
def _jaxseq_servers() -> Iterator[Callable[..., ServerProcess]]:
    """``start(checkpoint, blocks, prefix, peers, extra_args=())`` starts a jaxseq server and waits until it is
    ready; every server started is SIGKILLed (its process group, by PID) on leaving, whatever happened."""
    started: list[ServerProcess] = []

    def start(checkpoint, blocks, prefix, peers, extra_args=()):
        server = ServerProcess(str(checkpoint), blocks, prefix, peers, ["--throughput", "1.0", *extra_args])
        started.append(server)
        return server.wait_ready()

    try:
        yield start
    finally:
        for server in started:
            server.kill()


@pytest.fixture
def jaxseq_servers():
    with _jaxseq_servers() as start:
        yield start


@functools.cache
def _want(path: str) -> np.ndarray:
    """transformers' greedy ``generate`` of 16 tokens after ``IDS``: the generation tests' reference, computed once."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf.generate(torch.from_numpy(np.asarray(IDS)), max_new_tokens=16, do_sample=False).numpy()


# --- a jaxseq client through Petals servers ---------------------------------------------------------


class TestThroughPetalsServers:
    """Both tests use one swarm of two Petals servers (blocks 0:4 and 4:8): a Petals server takes many seconds to
    start and to stop, and neither test changes the servers (no fault, no counter read)."""

    @pytest.fixture(scope="class")
    @classmethod
    def petals_swarm(cls, petals_py, petals_checkpoint, tmp_path_factory):
        path, _, _ = petals_checkpoint
        logs = tmp_path_factory.mktemp("petals-logs")
        with (
            petals_server(petals_py, path, block_indices="0:4", dht_prefix="interop1", log_dir=logs) as first,
            petals_server(
                petals_py, path, block_indices="4:8", dht_prefix="interop1", initial_peers=[first.maddr], log_dir=logs
            ) as second,
        ):
            yield first, second, "interop1"

    def test_jaxseq_client_through_petals_servers(self, petals_checkpoint, petals_swarm):
        path, cfg, params = petals_checkpoint
        first, second, prefix = petals_swarm
        local = training_step(lambda x, p: jaxseq.local_sequential(cfg, params, x, p))
        # one micro-batch whatever the pings say (under load a loopback ping can open the long-link gate)
        config = jaxseq.ClientConfig(max_tokens_in_batch=8192, stream_bytes=None, **CLIENT)
        with RemoteSequenceManager([first.maddr], prefix, config) as manager:
            assert manager.num_blocks == 8  # from the Petals servers' _petals.models record
            step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
            for batch, seq, prompt_len in [(2, 7, 3), (8, 1024, 16)]:  # the second is 2 MiB: streamed both ways
                x, prompts = random_inputs(cfg, batch, seq, prompt_len)
                assert_matches(step(x, prompts), local(x, prompts))
            routes = {(r.peer, r.start, r.end) for r in manager.records}
            assert routes == {(first.peer_id, 0, 4), (second.peer_id, 4, 8)}
        log = first.log_tail(400) + second.log_tail(400)
        assert "rpc_forward_stream" in log and "rpc_backward_stream" in log

    def test_jaxseq_generates_through_petals_servers(self, petals_checkpoint, petals_swarm):
        path, _, _ = petals_checkpoint
        first, _, prefix = petals_swarm
        ids = np.asarray(IDS)
        with RemoteSequenceManager([first.maddr], prefix, jaxseq.ClientConfig(**CLIENT)) as manager:
            got = jaxseq.DistributedCausalLM(path, manager).generate(ids, max_new_tokens=16)
        assert "rpc_inference" in first.log_tail(4000)
        np.testing.assert_array_equal(got, _want(str(path)))


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
            # a client's own LoRA weights: the Petals server, alone on blocks 0:4, takes none (its record says
            # no jaxseq_client_lora_rank), so the call fails at once, saying why, and nothing reaches it
            lora = random_lora_weights(cfg, rank=2, targets=("q_proj",))
            with pytest.raises(jaxseq.LoraUnsupportedError, match="block 0 .* Petals servers take none"):
                with jaxseq.swarm_errors(manager):
                    jax.jit(lambda x: jaxseq.remote_sequential(x, None, manager, lora))(x)
            backup = jaxseq_servers(path, (0, 8), "interop2", [ours.maddr])
            petals.process.send_signal(9)  # SIGKILL the Petals server mid-training
            for i in range(3):
                p = prompts * (1 + 0.1 * i)
                assert_matches(step(x, p), local(x, p))
            assert manager.retries >= 1
            assert any(r.peer == backup.peer_id for r in manager.records)


# --- Petals clients through jaxseq servers -----------------------------------------------------------


class TestThroughJaxseqServers:
    """A Petals client's training step and its generation (greedy and beam search) through one swarm of two jaxseq
    servers (blocks 0:4 and 4:8): none of the tests changes the servers, and the pushes each generation made are
    counted from what the server had sent before it."""

    @pytest.fixture(scope="class")
    @classmethod
    def jaxseq_swarm(cls, petals_checkpoint):
        path, _, _ = petals_checkpoint
        with _jaxseq_servers() as start:
            first = start(path, (0, 4), "interop3", None)
            start(path, (4, 8), "interop3", [first.maddr])
            yield first, "interop3"

    def test_petals_client_through_jaxseq_servers(self, petals_py, petals_checkpoint, jaxseq_swarm):
        path, _, _ = petals_checkpoint
        first, prefix = jaxseq_swarm
        result = petals_client_fwd_bwd(petals_py, path, [first.maddr], dht_prefix=prefix, batch=3, seq=12)
        assert result["first_block_change"] > 0.3, result  # blocks matter
        for key in ("rel_logits", "rel_grad_inputs_embeds", "rel_grad_lm_head", "rel_grad_norm"):
            assert result[key] < TOL, (key, result)

    @pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam-search"])
    def test_petals_client_generates_through_jaxseq_servers(
        self, petals_py, petals_checkpoint, jaxseq_swarm, num_beams
    ):
        """Petals' ``generate`` over jaxseq's ``rpc_inference`` (beam search sends hypo_ids) equals the same
        ``generate`` of the local transformers model."""
        path, _, _ = petals_checkpoint
        first, prefix = jaxseq_swarm
        with RemoteSequenceManager([first.maddr], prefix) as manager:
            sent_before = manager.server_info(first.peer_id)["jaxseq_pushes"]["sent"]
            result = petals_client_generate(petals_py, path, [first.maddr], IDS, dht_prefix=prefix, num_beams=num_beams)
            assert result["remote"] == result["local"], result
            assert len(result["local"][0]) == len(IDS[0]) + 16
            # Petals' client named the next server in each step: the first server pushed its outputs there
            assert manager.server_info(first.peer_id)["jaxseq_pushes"]["sent"] > sent_before


def test_petals_client_with_an_adapter_trains_and_generates_through_jaxseq_servers(
    petals_py, petals_checkpoint, jaxseq_servers, tmp_path
):
    """A Petals client naming a LoRA adapter (``active_adapter``) routes to jaxseq servers that announce it, and
    its logits, gradients and greedy tokens equal the Petals venv's transformers with that adapter loaded by its
    peft (0.5)."""
    path, cfg, params = petals_checkpoint
    folder = random_adapter(tmp_path / "lora", cfg, rank=4, alpha=8, std=0.05)
    adapted = with_adapter(params, load_adapter(folder, cfg, range(8)).blocks)
    x = jax.random.normal(jax.random.key(0), (1, 8, cfg.hidden_size))
    assert rel_err(jaxseq.local_sequential(cfg, adapted, x), jaxseq.local_sequential(cfg, params, x)) > 0.03
    args = ("--adapters", f"org/tiny-lora={folder}")
    first = jaxseq_servers(path, (0, 4), "interop-lora", None, args)
    jaxseq_servers(path, (4, 8), "interop-lora", [first.maddr], args)
    result = petals_client_fwd_bwd(
        petals_py, path, [first.maddr], dht_prefix="interop-lora", batch=2, seq=9, adapter=("org/tiny-lora", folder)
    )
    for key in ("rel_logits", "rel_grad_inputs_embeds", "rel_grad_lm_head", "rel_grad_norm"):
        assert result[key] < TOL, (key, result)
    generated = petals_client_generate(
        petals_py, path, [first.maddr], IDS, dht_prefix="interop-lora", adapter=("org/tiny-lora", folder)
    )  # its inference sessions name the adapter in their opening requests
    assert generated["remote"] == generated["local"], generated


# --- generation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[True, False], ids=["petals-then-jaxseq", "jaxseq-then-petals"])
def mixed_chain(request, petals_py, petals_checkpoint, tmp_path_factory):
    """A chain of a Petals server and a jaxseq server, the Petals one first (blocks 0:4) or second (4:8), shared by
    both ``server_to_server`` cases: (petals first, the Petals server, the jaxseq server, the prefix)."""
    path, _, _ = petals_checkpoint
    petals_first = request.param
    prefix = f"interop-mixed-{int(petals_first)}"
    petals_blocks, our_blocks = ("0:4", (4, 8)) if petals_first else ("4:8", (0, 4))
    logs = tmp_path_factory.mktemp("mixed-logs")
    with petals_server(petals_py, path, block_indices=petals_blocks, dht_prefix=prefix, log_dir=logs) as petals:
        with _jaxseq_servers() as start:
            yield petals_first, petals, start(path, our_blocks, prefix, [petals.maddr]), prefix


@pytest.mark.parametrize("server_to_server", [True, False], ids=["with-rpc_push", "without-rpc_push"])
def test_mixed_chains_generate(petals_checkpoint, mixed_chain, server_to_server):
    """A chain of a Petals server and a jaxseq server, in either order: jaxseq's ``generate`` equals
    transformers', with servers pushing their outputs to the next one (Petals' ``next_servers``) or not."""
    path, _, _ = petals_checkpoint
    petals_first, petals, ours, prefix = mixed_chain
    ids = np.asarray(IDS)
    config = jaxseq.ClientConfig(server_to_server=server_to_server, **CLIENT)
    with RemoteSequenceManager([petals.maddr], prefix, config) as manager:
        sent_before = manager.server_info(ours.peer_id)["jaxseq_pushes"]["sent"]  # the other case's, if it ran
        got = jaxseq.DistributedCausalLM(path, manager).generate(ids, max_new_tokens=16)
        pushes = manager.server_info(ours.peer_id)["jaxseq_pushes"]
    np.testing.assert_array_equal(got, _want(str(path)))
    if not petals_first:  # the jaxseq server pushed its outputs on to Petals' when the client named it
        assert (pushes["sent"] > sent_before) == server_to_server, (pushes, sent_before)
    # (a Petals 2.2 server pushes with its session's opening metadata, which names no next server when the
    # client is jaxseq's: see docs/protocol.md)
