"""Inference sessions and ``generate`` through the swarm, against transformers and local computation: greedy tokens
equal transformers' ``generate``; steps equal the blocks run locally; failover, rollback, beam-search reordering,
sampling; attention caches bounded, freed, and refused clearly when full."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxseq
from jaxseq.models.decoder import lm_logits

from helpers import rel_err

TOL = 1e-5


@pytest.fixture
def swarm_model(checkpoint):
    """A ``DistributedCausalLM`` over a ``LocalSwarm`` of the tiny checkpoint: two servers that each hold
    every block, so that either can replace the other."""
    path, cfg, params = checkpoint
    swarm = jaxseq.LocalSwarm(cfg, params, [(0, 4), (0, 4)])
    manager = swarm.sequence_manager(jaxseq.ClientConfig(min_backoff=0.01, max_backoff=0.05))
    yield swarm, manager, jaxseq.DistributedCausalLM(path, manager)
    manager.close()


def _ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 1000, (batch, length))


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_generation_equals_transformers(swarm_model, hf_model, batch):
    _, _, model = swarm_model
    ids = _ids(batch, 5)
    want = hf_model.generate(torch.from_numpy(ids), max_new_tokens=32, do_sample=False).numpy()
    got = model.generate(ids, max_new_tokens=32)
    assert got.shape == want.shape == (batch, 37)
    np.testing.assert_array_equal(got, want)


def test_session_steps_equal_the_blocks_run_locally(checkpoint, swarm_model):
    """Prompts with the first step, several steps, beam-search reordering and a rollback: every step's outputs
    equal the blocks recomputed locally over the whole sequence so far."""
    _, cfg, params = checkpoint
    _, manager, _ = swarm_model
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 12, cfg.hidden_size)).astype(np.float32)
    prompts = rng.normal(0, 0.5, (cfg.num_hidden_layers, 3, 2, cfg.hidden_size)).astype(np.float32)

    def local(x):
        # Over the whole sequence, one shape (one compile): causal attention makes positions up to t the
        # same as over the first t + 1 positions alone.
        return np.asarray(jaxseq.local_sequential(cfg, params, jnp.asarray(x), jnp.asarray(prompts)))

    with manager.inference_session(max_length=16, batch_size=3) as session:
        want = local(x)
        assert rel_err(session.step(x[:, :4], prompts), want[:, :4]) < TOL
        for t in range(4, 8):
            assert rel_err(session.step(x[:, t : t + 1]), want[:, t : t + 1]) < TOL
        order = np.array([2, 2, 0])  # beam search: rows continue from other rows' histories (prompts included)
        x[:, :8], prompts[:] = x[order, :8], prompts[:, order]
        assert rel_err(session.step(x[:, 8:9], hypo_ids=order), local(x)[:, 8:9]) < TOL
        session.position = 6  # roll back, and continue differently
        x[:, 6:8] = rng.normal(size=(3, 2, cfg.hidden_size))
        assert rel_err(session.step(x[:, 6:8]), local(x)[:, 6:8]) < TOL


def test_rollback_regenerates_what_a_fresh_session_gives(swarm_model):
    _, manager, model = swarm_model
    x = np.random.default_rng(1).normal(size=(2, 10, 32)).astype(np.float32)
    with manager.inference_session(max_length=10, batch_size=2) as session:
        session.step(x[:, :6])
        session.step(x[:, 6:8])
        session.position = 4
        again = session.step(x[:, 4:10])
    with manager.inference_session(max_length=10, batch_size=2) as fresh:
        want = fresh.step(x)[:, 4:]
    np.testing.assert_allclose(again, want, rtol=0, atol=1e-6)


def test_a_server_failing_mid_generation_loses_no_token(swarm_model):
    swarm, manager, model = swarm_model
    ids = _ids(2, 4, seed=2)
    want = model.generate(ids, max_new_tokens=24)
    used = [s for s in swarm.servers if s.calls["inference"]]
    assert len(used) == 1  # one server held the whole chain

    def kill_midway(tokens, seen=[]):  # noqa: B006 (counts the calls of this one generation)
        seen.append(tokens)
        if len(seen) == 10:
            used[0].kill()

    got = model.generate(ids, max_new_tokens=24, on_tokens=kill_midway)
    np.testing.assert_array_equal(got, want)
    assert not used[0].alive and manager.retries >= 1
    other = next(s for s in swarm.servers if s is not used[0])
    assert other.calls["inference"] > 0  # the replacement was given the history and continued


@pytest.mark.parametrize("through", ["LocalSwarm", pytest.param("servers", marks=pytest.mark.network)])
def test_deep_prompts_apply_in_generation_as_in_training(checkpoint, request, through):
    """A deep-prompt-tuned model generates what the blocks, run locally with the same prompts, choose: in
    process, and through two real servers with overlapping spans (each span is sent its blocks' prompts)."""
    path, cfg, params = checkpoint
    if through == "LocalSwarm":
        _, manager, _ = request.getfixturevalue("swarm_model")
    else:
        servers, prefix = request.getfixturevalue("start_servers")([(0, 3), (1, 4)])
        manager = jaxseq.RemoteSequenceManager([servers[0].maddr], prefix)
        request.addfinalizer(manager.close)
    model = jaxseq.DistributedCausalLM(path, manager, tuning_mode="deep_ptune", prompt_len=3)
    model.deep_prompts[...] = 0.5 * jax.random.normal(jax.random.key(3), model.deep_prompts[...].shape)
    ids = _ids(2, 4, seed=4)
    got = model.generate(ids, max_new_tokens=12)
    tokens = ids
    total = ids.shape[1] + 12
    blocks = jax.jit(lambda hidden, prompts: jaxseq.local_sequential(cfg, params, hidden, prompts))
    for _ in range(12):  # the reference: the whole sequence through the blocks, every step
        # (padded at the end to one length, which causal attention keeps from the real positions: one compile)
        padded = np.pad(tokens, ((0, 0), (0, total - tokens.shape[1])))
        out = blocks(*model.embed(jnp.asarray(padded), with_prompts=True))
        last = out[:, tokens.shape[1] - total - 1]
        logits = lm_logits(last, model.norm[...], model.lm_head[...], cfg.rms_norm_eps)
        tokens = np.concatenate([tokens, np.asarray(jnp.argmax(logits, -1))[:, None]], axis=1)
    np.testing.assert_array_equal(got, tokens)


def test_sampling_is_reproducible_and_draws_from_the_local_distribution(checkpoint, swarm_model):
    path, cfg, params = checkpoint
    _, manager, model = swarm_model
    ids = _ids(2, 4, seed=5)
    options = dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=50, top_p=0.9)
    first = model.generate(ids, key=jax.random.key(7), **options)
    np.testing.assert_array_equal(first, model.generate(ids, key=jax.random.key(7), **options))
    assert not np.array_equal(first, model.generate(ids, key=jax.random.key(8), **options))
    # each step's distribution: the session's logits equal the blocks' logits computed locally
    full = jaxseq.local_sequential(cfg, params, model.embed(jnp.asarray(first), False)[0])  # causal: any prefix
    with manager.inference_session(max_length=first.shape[1], batch_size=2) as session:
        out = session.step(np.asarray(model.embed(jnp.asarray(first[:, :4]), False)[0]))
        for t in range(4, first.shape[1]):
            want = lm_logits(full[:, t - 1], model.norm[...], model.lm_head[...], cfg.rms_norm_eps)
            assert rel_err(model.logits(jnp.asarray(out[:, -1])), want) < TOL
            out = session.step(np.asarray(model.embed(jnp.asarray(first[:, t : t + 1]), False)[0]))


@pytest.mark.parametrize(
    "step,message",
    [
        (dict(x=np.zeros((2, 5, 32))), r"a step takes hidden states \[batch=1"),
        (dict(x=np.zeros((1, 9, 32))), "does not fit the session's max_length 8"),
        (dict(x=np.full((1, 2, 32), np.nan)), "non-finite"),
        (dict(x=np.zeros((1, 2, 32)), prompts=np.zeros((3, 1, 2, 32))), r"prompts must be \[n_blocks=4"),
        (dict(x=np.zeros((1, 2, 32)), hypo_ids=np.array([1])), "hypo_ids must be 1 row numbers"),
    ],
)
def test_bad_steps_are_refused_before_any_call(swarm_model, step, message):
    swarm, manager, _ = swarm_model
    with manager.inference_session(max_length=8, batch_size=1) as session:
        with pytest.raises(ValueError, match=message):
            session.step(**step)
    assert all(s.calls["inference"] == 0 for s in swarm.servers)


# --- real servers -----------------------------------------------------------------------------
@pytest.mark.network
def test_generation_through_servers_survives_a_sigkill(checkpoint, hf_model, start_servers):
    """Two servers hold every block; the one a generation uses is SIGKILLed mid-generation: the tokens are
    transformers' all the same, and the other server carried on from the replayed history."""
    path, _, _ = checkpoint
    servers, prefix = start_servers([(0, 4), (0, 4)])
    ids = _ids(2, 5, seed=6)
    want = hf_model.generate(torch.from_numpy(ids), max_new_tokens=32, do_sample=False).numpy()
    config = jaxseq.ClientConfig(min_backoff=0.1, max_backoff=0.5, request_timeout=20.0)
    with jaxseq.RemoteSequenceManager([servers[0].maddr], prefix, config) as manager:
        model = jaxseq.DistributedCausalLM(path, manager)
        killed = []

        def kill_midway(tokens):
            killed.append(tokens)
            if len(killed) == 12:
                computed = {s.peer_id: manager.server_info(s.peer_id)["jaxseq_computed"]["inference"] for s in servers}
                victim = next(s for s in servers if computed[s.peer_id] > 0)
                victim.kill()
                killed.append(victim)

        got = model.generate(ids, max_new_tokens=32, on_tokens=kill_midway)
        victim = killed[12]
        survivor = next(s for s in servers if s is not victim)
        assert manager.server_info(survivor.peer_id)["jaxseq_computed"]["inference"] > 0
        assert manager.retries >= 1
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", range(3))
def test_attention_cache_pool_survives_sessions_cancelled_at_any_moment(seed):
    """Clients leave at any moment (their stream's task is cancelled), also while a session ends or waits for
    room: every block-token comes back, and waiting sessions still get theirs."""
    from jaxseq.server.attention_cache import AttentionCache, CacheFull

    async def sessions() -> int:
        rng = random.Random(seed)
        pool = AttentionCache(num_blocks=2, pages_per_block=10)

        async def session() -> None:
            with contextlib.suppress(CacheFull):
                pages = await pool.allocate(range(2), rng.randint(1, 6), timeout=rng.uniform(0, 0.02))
                try:
                    await asyncio.sleep(rng.uniform(0, 0.01))
                finally:
                    pool.free(range(2), pages)

        tasks = [asyncio.ensure_future(session()) for _ in range(200)]
        for _ in range(100):
            await asyncio.sleep(rng.uniform(0, 0.002))
            rng.choice(tasks).cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pool.allocate(range(2), 10, timeout=0.0)  # all of it is free again
        return pool.max_block_tokens - pool.block_tokens_left

    assert asyncio.run(asyncio.wait_for(sessions(), timeout=30)) == 2 * 10 * 8


@pytest.mark.network
def test_attention_cache_is_bounded_refused_clearly_and_freed(checkpoint, start_servers, tmp_path):
    path, cfg, _ = checkpoint
    # 4 blocks x 16 tokens: one session of batch 1 and 16 positions fills it
    args = ["--attn-cache-tokens", "16", "--inference-idle-timeout", "2"]
    servers, prefix = start_servers([(0, 4)], extra_args=args)
    config = jaxseq.ClientConfig(alloc_timeout=0.5, max_retries=1, min_backoff=0.1)
    x = np.zeros((1, 2, cfg.hidden_size), np.float32)
    with jaxseq.RemoteSequenceManager([servers[0].maddr], prefix, config) as manager:

        def left() -> int:
            return manager.server_info(servers[0].peer_id)["cache_tokens_available"]

        full = left()
        assert full == 2 * 16 * 4  # Petals' unit: one token's keys, or values, in one block
        with manager.inference_session(max_length=16, batch_size=1) as first:
            first.step(x)
            assert left() == 0
            with manager.inference_session(max_length=16, batch_size=1) as second:
                started = time.monotonic()
                with pytest.raises(jaxseq.RemoteCallError, match="attention cache full"):
                    second.step(x)
                assert time.monotonic() - started >= 0.5  # it waited for room first
        assert _eventually(lambda: left() == full)  # freed when the session ended

        with manager.inference_session(max_length=16, batch_size=1) as idle:
            idle.step(x)
            assert left() == 0
            assert _eventually(lambda: left() == full, timeout=10)  # freed after the idle timeout

        # a client process that opens a session and is SIGKILLed: its session's cache is freed
        code = f"""
import sys, time, numpy as np, jaxseq
with jaxseq.RemoteSequenceManager([{servers[0].maddr!r}], {prefix!r}) as m:
    s = m.inference_session(max_length=16, batch_size=1)
    s.step(np.zeros((1, 2, {cfg.hidden_size}), np.float32))
    print("STEPPED", flush=True)
    time.sleep(600)
"""
        client = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            assert client.stdout is not None and client.stdout.readline().strip() == "STEPPED"
            assert left() == 0
        finally:
            # its whole process group: hivemind runs the client's DHT in a forked child (with its own p2pd),
            # which killing the client's PID alone leaves running
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(timeout=30)
        assert _eventually(lambda: left() == full, timeout=10)


@pytest.mark.network
def test_concurrent_sessions_are_batched_and_compile_per_bucket(checkpoint, start_servers):
    """Four clients' sessions on one server, stepping at once: every step equals the blocks run locally, their
    decode steps were computed together, and sessions whose lengths fall in one bucket compile nothing new."""
    _, cfg, params = checkpoint
    servers, prefix = start_servers([(0, 4)])
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(batch, 12, cfg.hidden_size)).astype(np.float32) for batch in (1, 2, 1, 3)]
    started = threading.Barrier(len(xs))
    with jaxseq.RemoteSequenceManager([servers[0].maddr], prefix) as manager:

        def session_outputs(x: np.ndarray, max_length: int = 16) -> np.ndarray:
            with manager.inference_session(max_length=max_length, batch_size=len(x)) as session:
                outputs = [session.step(x[:, :4])]
                started.wait(timeout=60)
                outputs += [session.step(x[:, t : t + 1]) for t in range(4, 12)]
            return np.concatenate(outputs, axis=1)

        with ThreadPoolExecutor(len(xs)) as pool:
            got = list(pool.map(session_outputs, xs))
        for x, out in zip(xs, got):
            assert rel_err(out, np.asarray(jaxseq.local_sequential(cfg, params, jnp.asarray(x)))) < TOL
        info = manager.server_info(servers[0].peer_id)
        assert info["jaxseq_inference_calls"]["steps"] > info["jaxseq_inference_calls"]["calls"]

        started = threading.Barrier(1)
        compiled = []
        for max_length in (40, 50, 64):  # 5, 7 and 8 pages of 8 positions: one bucket of 8 pages
            session_outputs(xs[0], max_length)
            compiled.append(manager.server_info(servers[0].peer_id)["jaxseq_compiled"])
        assert compiled[0] == compiled[1] == compiled[2]


def _eventually(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.fixture(scope="module")
def idle_server(module_servers):
    """One server of every block, shared by the cases below: each checks that the server computed nothing."""
    return module_servers([(0, 4)])


@pytest.mark.network
@pytest.mark.parametrize(
    "rpc,metadata,named",
    [
        ("rpc_forward", {"points": "lots"}, "points"),
        ("rpc_backward", {"active_adapter": 5}, "active_adapter"),
        ("rpc_forward", {"args_structure": "xxxxxxxxxx"}, "args_structure"),
        ("rpc_inference", {"max_length": "x"}, "max_length"),
        ("rpc_inference", {"max_length": 8, "points": "lots"}, "points"),
    ],
)
def test_metadata_of_the_wrong_type_is_refused_by_name(checkpoint, idle_server, rpc, metadata, named):
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2

    from jaxseq.remote import protocol

    _, cfg, _ = checkpoint
    servers, prefix = idle_server
    x = np.zeros((1, 2, cfg.hidden_size), np.float32)
    tensors = [protocol.serialize(x)] * (2 if rpc == "rpc_backward" else 1)
    request = runtime_pb2.ExpertRequest(
        uid=protocol.span_uids(prefix, 0, 4), tensors=tensors, metadata=protocol.encode_metadata(metadata)
    )
    with jaxseq.RemoteSequenceManager([servers[0].maddr], prefix) as manager:
        p2p, peer = manager._open_p2p, PeerID.from_base58(servers[0].peer_id)
        name = f"{protocol.HANDLER}.{rpc}"

        async def call():
            if rpc == "rpc_inference":
                stream = await p2p.iterate_protobuf_handler(peer, name, _one(request), runtime_pb2.ExpertResponse)
                return await asyncio.wait_for(stream.__anext__(), 30)
            return await p2p.call_protobuf_handler(peer, name, request, runtime_pb2.ExpertResponse)

        with pytest.raises(Exception, match=f"metadata key '{named}'|{named}"):
            manager.run(call())
        assert manager.server_info(servers[0].peer_id)["jaxseq_computed"] == {
            "forward": 0,
            "backward": 0,
            "inference": 0,
        }
    assert servers[0].process.poll() is None  # and the server goes on


async def _one(request):
    """A stream of one request that stays open, as a client's session does, so that the reply can come."""
    yield request
    await asyncio.sleep(60)
