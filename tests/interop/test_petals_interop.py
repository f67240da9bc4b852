"""jaxseq against a real Petals 2.2: a jaxseq client through Petals servers, a mixed swarm with a
SIGKILL, and a Petals client through jaxseq servers. Every comparison is with a local computation."""

from __future__ import annotations

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


@pytest.fixture
def jaxseq_servers():
    started: list[ServerProcess] = []

    def start(checkpoint, blocks, prefix, peers, extra_args=()):
        server = ServerProcess(
            str(checkpoint), blocks, prefix, peers, ["--throughput", "1.0", *extra_args]
        ).wait_ready()
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


def test_petals_client_through_jaxseq_servers(petals_py, petals_checkpoint, jaxseq_servers):
    path, _, _ = petals_checkpoint
    first = jaxseq_servers(path, (0, 4), "interop3", None)
    jaxseq_servers(path, (4, 8), "interop3", [first.maddr])
    result = petals_client_fwd_bwd(petals_py, path, [first.maddr], dht_prefix="interop3", batch=3, seq=12)
    assert result["first_block_change"] > 0.3, result  # blocks matter
    for key in ("rel_logits", "rel_grad_inputs_embeds", "rel_grad_lm_head", "rel_grad_norm"):
        assert result[key] < TOL, (key, result)


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


@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam-search"])
def test_petals_client_generates_through_jaxseq_servers(petals_py, petals_checkpoint, jaxseq_servers, num_beams):
    """Petals' ``generate`` over jaxseq's ``rpc_inference`` (beam search sends hypo_ids) equals the same
    ``generate`` of the local transformers model."""
    path, _, _ = petals_checkpoint
    first = jaxseq_servers(path, (0, 4), f"interop-gen{num_beams}", None)
    jaxseq_servers(path, (4, 8), f"interop-gen{num_beams}", [first.maddr])
    result = petals_client_generate(
        petals_py, path, [first.maddr], IDS, dht_prefix=f"interop-gen{num_beams}", num_beams=num_beams
    )
    assert result["remote"] == result["local"], result
    assert len(result["local"][0]) == len(IDS[0]) + 16
    with RemoteSequenceManager([first.maddr], f"interop-gen{num_beams}") as manager:
        # Petals' client named the next server in each step: the first server pushed its outputs there
        assert manager.server_info(first.peer_id)["jaxseq_pushes"]["sent"] > 0


def _want(path, ids: np.ndarray) -> np.ndarray:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf.generate(torch.from_numpy(ids), max_new_tokens=16, do_sample=False).numpy()


def test_jaxseq_generates_through_petals_servers(petals_py, petals_checkpoint, tmp_path):
    path, _, _ = petals_checkpoint
    ids = np.asarray(IDS)
    with (
        petals_server(petals_py, path, block_indices="0:4", dht_prefix="interop-pgen", log_dir=tmp_path) as first,
        petals_server(
            petals_py,
            path,
            block_indices="4:8",
            dht_prefix="interop-pgen",
            initial_peers=[first.maddr],
            log_dir=tmp_path,
        ),
    ):
        with RemoteSequenceManager([first.maddr], "interop-pgen", jaxseq.ClientConfig(**CLIENT)) as manager:
            got = jaxseq.DistributedCausalLM(path, manager).generate(ids, max_new_tokens=16)
        assert "rpc_inference" in first.log_tail(4000)
    np.testing.assert_array_equal(got, _want(path, ids))


@pytest.mark.parametrize("server_to_server", [True, False], ids=["with-rpc_push", "without-rpc_push"])
@pytest.mark.parametrize("petals_first", [True, False], ids=["petals-then-jaxseq", "jaxseq-then-petals"])
def test_mixed_chains_generate(petals_py, petals_checkpoint, jaxseq_servers, tmp_path, server_to_server, petals_first):
    """A chain of a Petals server and a jaxseq server, in either order: jaxseq's ``generate`` equals
    transformers', with servers pushing their outputs to the next one (Petals' ``next_servers``) or not."""
    path, _, _ = petals_checkpoint
    ids = np.asarray(IDS)
    prefix = f"interop-mixed-{int(petals_first)}{int(server_to_server)}"
    petals_blocks, our_blocks = ("0:4", (4, 8)) if petals_first else ("4:8", (0, 4))
    with petals_server(petals_py, path, block_indices=petals_blocks, dht_prefix=prefix, log_dir=tmp_path) as petals:
        ours = jaxseq_servers(path, our_blocks, prefix, [petals.maddr])
        config = jaxseq.ClientConfig(server_to_server=server_to_server, **CLIENT)
        with RemoteSequenceManager([petals.maddr], prefix, config) as manager:
            got = jaxseq.DistributedCausalLM(path, manager).generate(ids, max_new_tokens=16)
            pushes = manager.server_info(ours.peer_id)["jaxseq_pushes"]
    np.testing.assert_array_equal(got, _want(path, ids))
    if not petals_first:  # the jaxseq server pushed its outputs on to Petals' when the client named it
        assert (pushes["sent"] > 0) == server_to_server, pushes
    # (a Petals 2.2 server pushes with its session's opening metadata, which names no next server when the
    # client is jaxseq's: see docs/protocol.md)
