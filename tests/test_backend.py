"""The server-side block backend: shape buckets (exact, bounded compiles) and the activation cache."""

from __future__ import annotations

import asyncio
import mmap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq
from jaxseq.server.backend import BlockBackend, bucket

from helpers import rel_err

TOL = 1e-5


def _arrays(cfg, batch, seq, prompt_len, n_blocks, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, seq, cfg.hidden_size)).astype(np.float32)
    prompts = (0.5 * rng.standard_normal((n_blocks, batch, prompt_len, cfg.hidden_size))).astype(np.float32)
    grad = rng.standard_normal(x.shape).astype(np.float32)
    return x, prompts, grad


def _reference(cfg, params, x, prompts, grad, start, end):
    out, vjp = jax.vjp(lambda x_, p_: jaxseq.local_sequential(cfg, params, x_, p_, start, end), x, prompts)
    return out, vjp(jnp.asarray(grad))


@pytest.mark.parametrize("n", [1, 5, 8, 9, 17, 100, 127, 128, 129, 1000, 1025])
def test_bucket_bounds_padding(n):
    b = bucket(n)
    assert n <= b <= max(n, 1.25 * n + 1)


@pytest.mark.parametrize("batch,seq,prompt_len", [(1, 1, 0), (3, 13, 2), (9, 33, 33)])
def test_padded_shapes_compute_exactly(tiny_cfg, tiny_params, batch, seq, prompt_len):
    backend = BlockBackend(tiny_cfg, tiny_params[1:3], start=1)
    x, prompts, grad = _arrays(tiny_cfg, batch, seq, prompt_len, 2)
    out_ref, (gx_ref, gp_ref) = _reference(tiny_cfg, tiny_params, x, prompts, grad, 1, 3)
    assert rel_err(backend.forward(x, prompts, 1, 3), out_ref) < TOL
    gx, gp, _ = backend.backward(x, prompts, grad, 1, 3)
    assert rel_err(gx, gx_ref) < TOL
    assert (gp is None) if prompt_len == 0 else rel_err(gp, gp_ref) < TOL


def test_compiles_are_bounded_over_50_random_shapes(tiny_cfg, tiny_params):
    backend = BlockBackend(tiny_cfg, tiny_params)
    rng = np.random.default_rng(0)
    shapes = [(int(rng.integers(1, 65)), int(rng.integers(1, 257))) for _ in range(50)]
    for batch, seq in shapes:
        x, prompts, _ = _arrays(tiny_cfg, batch, seq, 0, 4)
        backend.forward(x, prompts, 0, 4)
    buckets = {(bucket(b), bucket(s)) for b, s in shapes}
    assert backend.compile_count == len(buckets) < 50
    # The bound whatever clients send: at most (8 + 4 per octave) buckets per axis up to the token limit.
    assert backend.compile_count <= (8 + 4 * 4) * (8 + 4 * 5)


def test_cached_backward_skips_the_recompute_and_equals_it(tiny_cfg, tiny_params):
    backend = BlockBackend(tiny_cfg, tiny_params)
    x, prompts, grad = _arrays(tiny_cfg, 2, 7, 3, 4)
    out_ref, (gx_ref, gp_ref) = _reference(tiny_cfg, tiny_params, x, prompts, grad, 0, 4)
    assert rel_err(backend.forward(x, prompts, 0, 4, cache_key="a"), out_ref) < TOL
    assert len(backend.cache) == 1 and backend.cache.nbytes > x.nbytes
    gx, gp, _ = backend.backward(x, prompts, grad, 0, 4, cache_key="a")
    assert backend.cache.hits == 1 and len(backend.cache) == 0 and backend.cache.nbytes == 0
    assert rel_err(gx, gx_ref) < TOL and rel_err(gp, gp_ref) < TOL


@pytest.mark.parametrize("mismatch", ["other key", "other inputs", "other prompts", "other span"])
def test_cache_misses_recompute_correctly(tiny_cfg, tiny_params, mismatch):
    backend = BlockBackend(tiny_cfg, tiny_params)
    x, prompts, grad = _arrays(tiny_cfg, 2, 7, 3, 4)
    backend.forward(x, prompts, 0, 4, cache_key="a")
    key, start = ("b" if mismatch == "other key" else "a"), (1 if mismatch == "other span" else 0)
    x_b = x + 1 if mismatch == "other inputs" else x
    prompts_b = prompts * 2 if mismatch == "other prompts" else prompts
    prompts_b = prompts_b[start:]
    _, (gx_ref, gp_ref) = _reference(tiny_cfg, tiny_params, x_b, prompts_b, grad, start, 4)
    gx, gp, _ = backend.backward(x_b, prompts_b, grad, start, 4, cache_key=key)
    assert backend.cache.hits == 0 and backend.cache.misses == 1
    assert rel_err(gx, gx_ref) < TOL and rel_err(gp, gp_ref) < TOL


def test_cache_keeps_its_own_copy_of_inputs_a_client_may_reuse(tiny_cfg, tiny_params):
    """Inputs can be views of a client's shared memory, which it rewrites for its next call: an entry
    must not change with them (else a backward with the new values would pass as a hit)."""
    backend = BlockBackend(tiny_cfg, tiny_params)
    x, prompts, grad = _arrays(tiny_cfg, 2, 7, 3, 4)
    memory = mmap.mmap(-1, x.nbytes + prompts.nbytes)  # like a client's segment: memory numpy doesn't own
    shared_x = np.frombuffer(memory, x.dtype, x.size).reshape(x.shape)
    shared_prompts = np.frombuffer(memory, prompts.dtype, prompts.size, x.nbytes).reshape(prompts.shape)
    shared_x[...], shared_prompts[...] = x, prompts
    backend.forward(shared_x, shared_prompts, 0, 4, cache_key="a")
    shared_x += 1
    shared_prompts *= 2
    _, (gx_ref, gp_ref) = _reference(tiny_cfg, tiny_params, x + 1, prompts * 2, grad, 0, 4)
    gx, gp, _ = backend.backward(shared_x, shared_prompts, grad, 0, 4, cache_key="a")
    assert backend.cache.hits == 0 and backend.cache.misses == 1
    assert rel_err(gx, gx_ref) < TOL and rel_err(gp, gp_ref) < TOL


def test_cache_is_bounded_in_bytes_and_age(tiny_cfg, tiny_params):
    probe = BlockBackend(tiny_cfg, tiny_params)
    probe.forward(*_arrays(tiny_cfg, 4, 64, 2, 4)[:2], 0, 4, cache_key="probe")
    limit = int(3.5 * probe.cache.nbytes)  # room for three entries
    backend = BlockBackend(tiny_cfg, tiny_params, cache_bytes=limit, cache_ttl=0.2)
    for i in range(50):
        x, prompts, _ = _arrays(tiny_cfg, 4, 64, 2, 4, seed=i)
        backend.forward(x, prompts, 0, 4, cache_key=i)
        assert backend.cache.nbytes <= limit
    assert len(backend.cache) == 3  # the newest three (LRU)
    time.sleep(0.3)
    x, prompts, grad = _arrays(tiny_cfg, 4, 64, 2, 4, seed=49)
    backend.backward(x, prompts, grad, 0, 4, cache_key=49)  # expired: recomputed, and the old entries are gone
    assert backend.cache.hits == 0 and len(backend.cache) == 0 and backend.cache.nbytes == 0


def test_cache_counts_activations_not_the_weights_every_entry_shares(tiny_cfg, tiny_params):
    """An entry's VJP closure holds the blocks' weights, which the server keeps anyway: counted per entry, they
    made the many one-row micro-batches of a long-link step evict each other before their backwards."""
    backend = BlockBackend(tiny_cfg, tiny_params)
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(backend.blocks))
    x, prompts, _ = _arrays(tiny_cfg, 1, 8, 2, 4)
    backend.forward(x, prompts, 0, 4, cache_key="probe")
    entry = backend.cache.nbytes
    assert x.nbytes + prompts.nbytes < entry < weights  # the activations, without any weight
    backend = BlockBackend(tiny_cfg, tiny_params, cache_bytes=int(8.5 * entry))
    for i in range(8):
        backend.forward(*_arrays(tiny_cfg, 1, 8, 2, 4, seed=i)[:2], 0, 4, cache_key=i)
    assert len(backend.cache) == 8 and backend.cache.nbytes == 8 * entry


def test_swarm_training_step_uses_the_cache(tiny_cfg, tiny_params, make_swarm):
    swarm, manager = make_swarm([(0, 2), (2, 4)], jaxseq.ClientConfig(max_tokens_in_batch=16))
    x = jax.random.normal(jax.random.key(0), (3, 7, tiny_cfg.hidden_size))
    step = jax.jit(jax.grad(lambda x: jnp.sum(jaxseq.remote_sequential(x, None, manager) ** 2)))
    for _ in range(3):
        step(x).block_until_ready()
    for server in swarm.servers:  # 2 micro-batches x 3 steps, every backward served from the cache
        assert server.backend.cache.hits == 6 and server.backend.cache.misses == 0
        assert len(server.backend.cache) == 0


def test_moves_to_and_from_the_device_are_timed_apart_from_compute(tiny_cfg, tiny_params, monkeypatch):
    """A server reports the time its inputs take to reach the blocks' memory (and the results to come
    back) as moving the data, not as compute: benchmarks of the wire must count it."""
    from jaxseq.server.config import ServerConfig
    from jaxseq.server.handler import TransformerConnectionHandler

    backend = BlockBackend(tiny_cfg, tiny_params)
    x, prompts, grad = _arrays(tiny_cfg, 2, 7, 3, 4)
    backend.forward(x, prompts, 0, 4)
    backend.backward(x, prompts, grad, 0, 4)  # compiled: what follows is transfers and compute alone
    delay, put = 0.05, jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda *args, **kwargs: (time.sleep(delay), put(*args, **kwargs))[1])
    runs = {  # inputs each places on the device
        "forward": (lambda: backend.forward(x, prompts, 0, 4, cache_key="k"), 2),
        "backward of the cached forward": (lambda: backend.backward_of_cached(grad, 0, 4, "k"), 1),
        "backward": (lambda: backend.backward(x, prompts, grad, 0, 4), 3),
    }
    for name, (run, placed) in runs.items():
        before = backend.transfer_s
        run()
        assert backend.transfer_s - before >= placed * delay, name

    config = ServerConfig(checkpoint="unused", blocks=(0, 4), dht_prefix="test", new_swarm=True)
    handler = TransformerConnectionHandler(backend, config, version="test")
    started = time.perf_counter()
    _, timing = asyncio.run(handler._compute(backend.backward, x, prompts, grad, 0, 4))
    assert time.perf_counter() - started >= 3 * delay
    assert 0 <= timing["compute_s"] < delay, timing
