"""remote_sequential on an in-process swarm equals local_sequential, under every transformation, with faults."""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq
from jaxseq.client import chain

from helpers import assert_matches, random_inputs, rel_err, training_step

TOL = 1e-5


def _loss(out):
    return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[-1], dtype=out.dtype))


def _reference(cfg, params, x, prompts):
    return training_step(lambda x, p: jaxseq.local_sequential(cfg, params, x, p))(x, prompts)


def _remote_value_and_grad(manager, x, prompts):
    return training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))(x, prompts)


@pytest.mark.parametrize(
    "batch,seq,prompt_len,max_tokens",
    [
        (1, 5, 0, 1024),  # batch 1, no prompts
        (3, 7, 2, 16),  # seq not dividing the token budget, 2 micro-batches
        (5, 37, 37, 64),  # prompts as long as the sequence, 5 micro-batches of 1 row
        (4, 130, 3, 1024),  # seq > max_tokens // batch: 4 micro-batches
    ],
)
def test_value_and_grad_equal_local(tiny_cfg, tiny_params, make_swarm, batch, seq, prompt_len, max_tokens):
    config = jaxseq.ClientConfig(max_tokens_in_batch=max_tokens, min_backoff=0.01)
    swarm, manager = make_swarm([(0, 2), (2, 4), (1, 3)], config)
    x, prompts = random_inputs(tiny_cfg, batch, seq, prompt_len)
    assert_matches(_remote_value_and_grad(manager, x, prompts), _reference(tiny_cfg, tiny_params, x, prompts))
    n_micro = len(chain.micro_batches(np.asarray(x), max_tokens, config.stream_bytes))
    assert swarm.servers[0].calls == {"forward": n_micro, "backward": n_micro, "inference": 0}
    assert swarm.servers[1].calls == {"forward": n_micro, "backward": n_micro, "inference": 0}
    assert swarm.servers[2].calls == {"forward": 0, "backward": 0, "inference": 0}


@pytest.mark.parametrize("fault", [None, (1, "forward"), (0, "backward")])
def test_streams_equal_one_call(tiny_cfg, tiny_params, make_swarm, fault):
    """Micro-batches cut by ``stream_bytes`` (one row each, all in flight at once) give the outputs and
    gradients of one unsplit call, also when a server fails mid-chain and the chain re-routes (equal to
    float32 rounding: XLA sums in another order for another batch size)."""
    x, prompts = random_inputs(tiny_cfg, 3, 6, 3)
    results = {}
    for stream_bytes in (None, 1):
        config = jaxseq.ClientConfig(
            stream_bytes=stream_bytes, stream_min_rtt=0.0, min_backoff=0.01, max_backoff=0.05, deadline=30.0
        )
        swarm, manager = make_swarm([(0, 2), (2, 4), (0, 2), (2, 4)], config)
        if fault is not None and stream_bytes == 1:
            swarm.servers[fault[0]].fail_next(2, stage=fault[1])
            swarm.servers[fault[0] + 2].fail_next(2, stage=fault[1])  # whichever of the pair is routed to
        results[stream_bytes] = _remote_value_and_grad(manager, x, prompts)
        forwards = sum(server.calls["forward"] for server in swarm.servers)
        assert forwards >= (2 * len(x) if stream_bytes else 2)
        if fault is not None and stream_bytes == 1:
            assert manager.retries >= 1
    assert_matches(results[1], results[None], tol=1e-6)


def test_streams_only_on_long_links(make_swarm):
    """Below ``stream_min_rtt`` (an in-process swarm's round trips are nil) a batch is not cut by bytes."""
    _, manager = make_swarm([(0, 4)], jaxseq.ClientConfig(stream_bytes=1))
    assert chain._micro_batches(manager, np.zeros((4, 3, 8), np.float32)) == [slice(0, 4)]


@pytest.mark.parametrize("rtt_before,rtt_after", [(0.0, 1.0), (1.0, 0.0)])
def test_backward_keeps_the_micro_batches_of_its_forward(tiny_cfg, tiny_params, make_swarm, rtt_before, rtt_after):
    """The long-link gate may open or close between a forward and its backward (a server's shortest ping is
    only known as pings come): the backward goes through the forward's micro-batches, not new ones."""
    config = jaxseq.ClientConfig(stream_bytes=1, stream_min_rtt=0.5, min_backoff=0.01, deadline=30.0)
    swarm, manager = make_swarm([(0, 2), (2, 4)], config)
    x, prompts = random_inputs(tiny_cfg, 3, 6, 2)

    async def pinged() -> None:  # the manager's first pings (in the background) would overwrite what is set below
        await manager._pinging

    manager.run(pinged())
    manager._shortest_rtt = {server.name: rtt_before for server in swarm.servers}
    out, vjp = jax.vjp(lambda x, p: jaxseq.remote_sequential(x, p, manager), x, prompts)
    manager._shortest_rtt = {server.name: rtt_after for server in swarm.servers}
    grads = vjp(jnp.cos(out) * jnp.arange(out.shape[-1], dtype=out.dtype))
    assert_matches(((0.0, out), grads), _reference(tiny_cfg, tiny_params, x, prompts))
    backwards = swarm.servers[0].calls["backward"]
    assert backwards == (len(x) if rtt_before else 1)  # as many as the forward's micro-batches, none again


def test_servers_compute_on_a_client_of_their_own(make_swarm):
    """On the CPU, emulated servers have an XLA client (and thread pool) apart from the caller's, whose
    pool thread XLA usually blocks in the backward callback (``benchmarks/callback_thread.py``)."""
    swarm, _ = make_swarm([(0, 2), (2, 4)])
    devices = {server.backend.device for server in swarm.servers}
    if jax.default_backend() != "cpu":
        assert devices == {None}
        return
    (device,) = devices
    assert device.client is not jax.devices()[0].client
    assert {d for leaf in jax.tree.leaves(swarm.servers[0].backend.blocks) for d in leaf.devices()} == {device}


def test_forward_and_grad_without_prompts(tiny_cfg, tiny_params, make_swarm):
    _, manager = make_swarm([(0, 4)])
    x, _ = random_inputs(tiny_cfg, 2, 9, 0)
    out = jax.jit(lambda x: jaxseq.remote_sequential(x, None, manager))(x)
    assert rel_err(out, jaxseq.local_sequential(tiny_cfg, tiny_params, x)) < TOL
    g = jax.grad(lambda x: _loss(jaxseq.remote_sequential(x, None, manager)))(x)
    g_ref = jax.grad(lambda x: _loss(jaxseq.local_sequential(tiny_cfg, tiny_params, x)))(x)
    assert rel_err(g, g_ref) < TOL


def test_grad_without_jit(tiny_cfg, tiny_params, make_swarm):
    _, manager = make_swarm([(0, 3), (3, 4)])
    x, prompts = random_inputs(tiny_cfg, 2, 6, 2)
    got = jax.grad(lambda x, p: _loss(jaxseq.remote_sequential(x, p, manager)), argnums=(0, 1))(x, prompts)
    _, want = _reference(tiny_cfg, tiny_params, x, prompts)
    assert rel_err(got[0], want[0]) < TOL and rel_err(got[1], want[1]) < TOL


@pytest.mark.parametrize("prompts_batched", [True, False])
def test_vmap_is_one_batched_request(tiny_cfg, tiny_params, make_swarm, prompts_batched):
    swarm, manager = make_swarm([(0, 4)])
    xs = jnp.stack([random_inputs(tiny_cfg, 2, 6, 2, seed=s)[0] for s in range(3)])
    _, prompts = random_inputs(tiny_cfg, 2, 6, 2)
    prompts_arg = jnp.stack([prompts * (i + 1) for i in range(3)]) if prompts_batched else prompts

    def loss(x, p):
        return _loss(jaxseq.remote_sequential(x, p, manager))

    def loss_ref(x, p):
        return _loss(jaxseq.local_sequential(tiny_cfg, tiny_params, x, p))

    in_axes = (0, 0 if prompts_batched else None)
    got = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1)), in_axes=in_axes))(xs, prompts_arg)
    want = jax.vmap(jax.value_and_grad(loss_ref, argnums=(0, 1)), in_axes=in_axes)(xs, prompts_arg)
    assert rel_err(got[0], want[0]) < TOL
    assert rel_err(got[1][0], want[1][0]) < TOL
    assert rel_err(got[1][1], want[1][1]) < TOL
    # 3 vmapped calls of batch 2 (36 tokens) fit in one micro-batch: one forward and one backward request.
    assert swarm.servers[0].calls == {"forward": 1, "backward": 1, "inference": 0}


def test_forward_fault_reroutes_from_failed_block(tiny_cfg, tiny_params, make_swarm):
    swarm, manager = make_swarm([(0, 2), (2, 4), (2, 4)], throughputs=[1.0, 2.0, 1.0])
    a, failing, other = swarm.servers  # the faster holder of 2:4 is tried first
    x, prompts = random_inputs(tiny_cfg, 2, 5, 1)
    failing.fail_next(1, "forward")
    assert_matches(_remote_value_and_grad(manager, x, prompts), _reference(tiny_cfg, tiny_params, x, prompts))
    # Blocks 0:2 are not redone; the failed span went to the other holder.
    assert a.calls == {"forward": 1, "backward": 1, "inference": 0}
    assert failing.calls == {"forward": 1, "backward": 0, "inference": 0}
    assert other.calls == {"forward": 1, "backward": 1, "inference": 0}
    assert manager.retries == 1


def test_backward_fault_reruns_span_forward_elsewhere(tiny_cfg, tiny_params, make_swarm):
    swarm, manager = make_swarm([(0, 2), (2, 4), (0, 4)])
    a, b, c = swarm.servers
    c.fail_next(1, "backward")
    x, prompts = random_inputs(tiny_cfg, 2, 5, 2)
    assert_matches(_remote_value_and_grad(manager, x, prompts), _reference(tiny_cfg, tiny_params, x, prompts))
    # c ran the forward of 0:4; its backward failed, so 0:4 was redone via a and b, then backward through them.
    assert c.calls == {"forward": 1, "backward": 1, "inference": 0}
    assert a.calls == {"forward": 1, "backward": 1, "inference": 0}
    assert b.calls == {"forward": 1, "backward": 1, "inference": 0}


def test_every_holder_of_a_block_fails_once(tiny_cfg, tiny_params, make_swarm):
    swarm, manager = make_swarm([(0, 2), (2, 4), (0, 4)])
    a, b, c = swarm.servers
    for server in (a, c):  # both holders of block 0
        server.fail_next(1, "forward")
        server.fail_next(1, "backward")
    x, prompts = random_inputs(tiny_cfg, 1, 4, 1)
    assert_matches(_remote_value_and_grad(manager, x, prompts), _reference(tiny_cfg, tiny_params, x, prompts))
    # forward: c (fails) -> a (fails) -> both banned, c banned longest ago: c (ok).
    # backward: c fails -> redo 0:4 forward avoiding c: a, b -> backward b, then a fails -> redo 0:2:
    #   a and c banned, c longest ago -> c runs forward 0:2 and its backward.
    assert a.calls == {"forward": 2, "backward": 1, "inference": 0}
    assert b.calls == {"forward": 1, "backward": 1, "inference": 0}
    assert c.calls == {"forward": 3, "backward": 2, "inference": 0}
    assert manager.retries == 4


def test_a_ban_never_makes_a_block_unreachable(tiny_cfg, tiny_params, make_swarm):
    swarm, manager = make_swarm([(0, 4)], jaxseq.ClientConfig(min_backoff=0.01, ban_timeout=60.0))
    swarm.servers[0].fail_next(2, "forward")
    x, prompts = random_inputs(tiny_cfg, 1, 4, 1)
    assert_matches(_remote_value_and_grad(manager, x, prompts), _reference(tiny_cfg, tiny_params, x, prompts))
    assert swarm.servers[0].calls["forward"] == 3


@pytest.mark.parametrize("lie", ["nan", "shape", "dtype"])
def test_faulty_server_is_banned_and_routed_around(tiny_cfg, tiny_params, make_swarm, lie):
    swarm, manager = make_swarm([(0, 4), (0, 4)], throughputs=[2.0, 1.0])
    liar = swarm.servers[0]
    honest_forward = liar.backend.forward

    def lying_forward(*args):
        out = honest_forward(*args)
        return {
            "nan": lambda: np.full_like(out, np.nan),
            "shape": lambda: out[:, :-1],
            "dtype": lambda: out.astype(np.float16),
        }[lie]()

    liar.backend.forward = lying_forward
    x, prompts = random_inputs(tiny_cfg, 2, 5, 1)
    for _ in range(3):
        assert_matches(_remote_value_and_grad(manager, x, prompts), _reference(tiny_cfg, tiny_params, x, prompts))
    assert liar.calls["forward"] == 1  # caught once, then banned for ban_timeout
    assert liar.calls["backward"] == 0


def test_retries_are_bounded_by_max_retries(tiny_cfg, make_swarm):
    swarm, manager = make_swarm([(0, 2), (2, 4)], jaxseq.ClientConfig(max_retries=3, min_backoff=0.01))
    swarm.servers[1].fail_next(100, "forward")
    x, _ = random_inputs(tiny_cfg, 1, 4, 0)
    with pytest.raises(Exception, match=r"RemoteCallError: forward of blocks 2:4: 4 failed attempts"):
        jax.jit(lambda x: jaxseq.remote_sequential(x, None, manager))(x).block_until_ready()
    assert isinstance(manager.last_error, jaxseq.RemoteCallError)
    assert swarm.servers[1].calls["forward"] == 4


def test_block_without_live_server_ends_within_deadline(tiny_cfg, make_swarm):
    deadline = 1.0
    swarm, manager = make_swarm([(0, 3), (3, 4)])
    x, _ = random_inputs(tiny_cfg, 1, 4, 0)
    forward = jax.jit(lambda x: jaxseq.remote_sequential(x, None, manager))
    forward(x).block_until_ready()  # compiled, on the client and the servers: what follows is the deadline alone
    manager.config = jaxseq.ClientConfig(max_retries=10_000, deadline=deadline, min_backoff=0.05, max_backoff=0.2)
    swarm.servers[1].kill()
    start = time.monotonic()
    with pytest.raises(Exception, match=r"MissingBlocksError: no reachable server holds block 3"):
        forward(x).block_until_ready()
    assert time.monotonic() - start < deadline + 0.5
    assert isinstance(manager.last_error, jaxseq.MissingBlocksError) and manager.last_error.block == 3


def test_training_survives_a_killed_server(tiny_cfg, tiny_params, make_swarm):
    swarm, manager = make_swarm([(0, 2), (2, 4), (0, 4)])
    x, prompts = random_inputs(tiny_cfg, 2, 5, 2)
    step = training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))
    want = _reference(tiny_cfg, tiny_params, x, prompts)
    for i in range(6):
        if i == 3:
            swarm.servers[2].kill()
        assert_matches(step(x, prompts), want)
    assert swarm.servers[0].calls["forward"] >= 3 and swarm.servers[1].calls["forward"] >= 3


@pytest.mark.parametrize(
    "x_shape,prompts_shape,dtype,message",
    [
        ((5, 32), None, jnp.float32, r"x must be \[batch, seq, hidden\]"),
        ((1, 5, 32), None, jnp.int32, "floating dtype"),
        ((1, 5, 16), None, jnp.float32, "hidden size 16"),
        ((1, 5, 32), (3, 1, 2, 32), jnp.float32, r"prompts must be \[n_blocks=4"),
        ((1, 5, 32), (4, 2, 2, 32), jnp.float32, r"prompts must be \[n_blocks=4, batch=1"),
        ((1, 5, 32), (4, 1, 6, 32), jnp.float32, "prompt length 6 exceeds the sequence length 5"),
        ((1, 5, 32), (4, 1, 2), jnp.float32, r"prompts must be \[n_blocks"),
    ],
)
def test_bad_input_fails_at_trace_time(make_swarm, x_shape, prompts_shape, dtype, message):
    swarm, manager = make_swarm([(0, 4)])
    x = jnp.zeros(x_shape, dtype)
    prompts = None if prompts_shape is None else jnp.zeros(prompts_shape, jnp.float32)
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda x, p: jaxseq.remote_sequential(x, p, manager)).trace(x, prompts)
    assert swarm.servers[0].calls == {"forward": 0, "backward": 0, "inference": 0}


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["hidden states", "prompts", "grad outputs"])
def test_non_finite_input_fails_clearly_and_blames_no_server(tiny_cfg, make_swarm, where, value):
    """NaN or inf from the caller is the caller's problem: a clear error before any call, and no server
    is banned for it (a server would refuse it, or answer NaN, and either looks like a faulty server)."""
    swarm, manager = make_swarm([(0, 2), (2, 4), (0, 4)])
    x, prompts = random_inputs(tiny_cfg, 2, 5, 2)
    x = x.at[1, 3, 0].set(value) if where == "hidden states" else x
    prompts = prompts.at[2, 0, 1, 5].set(value) if where == "prompts" else prompts
    weights = jnp.ones(x.shape).at[0, 0, 0].set(value if where == "grad outputs" else 1.0)
    loss = lambda x, p: jnp.sum(jaxseq.remote_sequential(x, p, manager) * weights)  # noqa: E731
    with pytest.raises(Exception, match=f"{where} sent to the swarm have non-finite values"):
        jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1)))(x, prompts))
    assert isinstance(manager.last_error, ValueError)
    assert manager.retries == 0 and not any(outcome != "ok" for _, outcome in manager.outcomes)
    assert sum(s.calls["backward"] for s in swarm.servers) == 0
    if where != "grad outputs":
        assert sum(s.calls["forward"] for s in swarm.servers) == 0


def test_saved_state_stays_bounded_over_1000_steps(tiny_cfg, make_swarm):
    swarm, manager = make_swarm([(0, 2), (2, 4)])
    x, prompts = random_inputs(tiny_cfg, 1, 4, 1)
    step = jax.jit(jax.grad(lambda x, p: _loss(jaxseq.remote_sequential(x, p, manager)), argnums=(0, 1)))
    forward_only = jax.jit(lambda x, p: jax.vjp(lambda x_: jaxseq.remote_sequential(x_, p, manager), x)[0])

    def run(n):
        for _ in range(n):
            jax.block_until_ready(step(x, prompts))
        return len(manager.saved)

    after_10 = run(10)
    after_1000 = run(990)
    assert after_1000 <= after_10 == 0  # each backward releases its forward's state
    # Forward rules whose backward never runs leave state behind, but only up to the LRU's capacity.
    for _ in range(3 * manager.config.max_saved_states):
        forward_only(x, prompts).block_until_ready()
    assert len(manager.saved) == manager.config.max_saved_states


def test_backward_recomputes_when_saved_state_was_dropped(tiny_cfg, tiny_params, make_swarm):
    config = jaxseq.ClientConfig(max_saved_states=1, min_backoff=0.01)
    swarm, manager = make_swarm([(0, 4)], config)
    x, prompts = random_inputs(tiny_cfg, 2, 5, 2)

    def loss(x, p):
        out, vjp = jax.vjp(lambda x_, p_: jaxseq.remote_sequential(x_, p_, manager), x, p)
        jaxseq.remote_sequential(x + 1, p, manager)  # unrelated call with state, evicting ours ...
        jax.vjp(lambda x_: jaxseq.remote_sequential(x_, p, manager), x + 2)
        return vjp(jnp.cos(out) * jnp.arange(out.shape[-1], dtype=out.dtype))

    got = loss(x, prompts)
    _, want = _reference(tiny_cfg, tiny_params, x, prompts)
    assert rel_err(got[0], want[0]) < TOL and rel_err(got[1], want[1]) < TOL
    assert swarm.servers[0].calls["forward"] == 4  # 3 forwards + 1 recomputed for the dropped state


def test_retries_and_bans_are_logged(tiny_cfg, make_swarm, caplog):
    swarm, manager = make_swarm([(0, 2), (2, 4)])
    swarm.servers[1].fail_next(1, "forward")
    x, _ = random_inputs(tiny_cfg, 1, 4, 0)
    with caplog.at_level(logging.WARNING, logger="jaxseq"):
        jax.block_until_ready(jaxseq.remote_sequential(x, None, manager))
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("jaxseq.")]
    assert any(m.startswith("banning server local-1 for 15 s: forward of blocks 2:4 failed") for m in messages), (
        messages
    )
    retry = "forward of blocks 2:4 failed at block 2 (attempt 1 of 9): server local-1: injected forward failure"
    assert any(m.startswith(retry) and "retrying in 0.01 s" in m for m in messages), messages


def test_swarm_errors_gives_the_typed_error_out_of_jit(tiny_cfg, make_swarm):
    swarm, manager = make_swarm([(0, 4)], jaxseq.ClientConfig(max_retries=1, min_backoff=0.01))
    x, _ = random_inputs(tiny_cfg, 1, 4, 0)
    forward = jax.jit(lambda x: jaxseq.remote_sequential(x, None, manager))
    swarm.servers[0].kill()
    with pytest.raises(jaxseq.MissingBlocksError) as missing:
        with jaxseq.swarm_errors(manager):
            forward(x).block_until_ready()
    assert missing.value.block == 0 and "MissingBlocksError" in str(missing.value.__cause__)
    assert not isinstance(missing.value.__cause__, jaxseq.SwarmError)  # chained to JAX's own error
    with pytest.raises(ValueError, match="hidden states sent to the swarm have non-finite values") as nan:
        with jaxseq.swarm_errors(manager):
            forward(x.at[0, 0, 0].set(jnp.nan)).block_until_ready()
    assert nan.value.__cause__ is not None  # the client's ValueError, not JAX's
    with pytest.raises(KeyError):  # anything else passes unchanged, even right after a swarm failure
        with jaxseq.swarm_errors(manager):
            raise KeyError("not the swarm's")
