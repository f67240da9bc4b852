"""Shared fixtures: a tiny Llama and in-process swarms built from it."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq
from jaxseq.remote.launch import ServerProcess

TINY = jaxseq.LlamaConfig(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
    rms_norm_eps=1e-5, rope_theta=10000.0,
)


# The 1e-5 float32 comparisons need full-precision matmuls: on GPUs XLA's default uses TF32 (about
# 1e-3 off); jaxseq-server defaults to this too (--matmul-precision). No effect on CPUs.
jax.config.update("jax_default_matmul_precision", "highest")


def rel_err(a, b) -> float:
    """Relative error ||a - b|| / ||b|| in float64, of arrays or torch tensors on any device."""
    a, b = (np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, np.float64) for v in (a, b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="session")
def tiny_cfg() -> jaxseq.LlamaConfig:
    return TINY


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    # A larger init than Llama's 0.02 so that a wrong block would show in the comparisons.
    return jaxseq.init_block_params(tiny_cfg, jax.random.key(0), std=0.2)


@pytest.fixture
def make_swarm(tiny_cfg, tiny_params):
    """Build a ``LocalSwarm`` and its manager; every manager is closed after the test."""
    managers = []

    def make(spans, config=None, **kwargs):
        config = config or jaxseq.ClientConfig(min_backoff=0.01, max_backoff=0.05, deadline=30.0)
        swarm = jaxseq.LocalSwarm(tiny_cfg, tiny_params, spans, **kwargs)
        manager = swarm.sequence_manager(config)
        managers.append(manager)
        return swarm, manager

    yield make
    for m in managers:
        m.close()


def training_step(blocks):
    """jit(value_and_grad) w.r.t. hidden states and prompts of a non-linear read-out of ``blocks(x, prompts)``
    (so gradients depend on every output differently); returns ``((loss, outputs), (grad_x, grad_prompts))``."""

    def loss(x, p):
        out = blocks(x, p)
        return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[-1], dtype=out.dtype)), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def matches(got, want, tol: float = 1e-5) -> bool:
    """Whether two ``training_step`` results agree: outputs and both gradients within ``tol`` (relative)."""
    ((_, out), grads), ((_, out_ref), grads_ref) = got, want
    return rel_err(out, out_ref) < tol and all(rel_err(g, r) < tol for g, r in zip(grads, grads_ref))


def assert_matches(got, want, tol: float = 1e-5) -> None:
    ((_, out), (gx, gp)), ((_, out_ref), (gx_ref, gp_ref)) = got, want
    assert rel_err(out, out_ref) < tol
    assert rel_err(gx, gx_ref) < tol
    assert rel_err(gp, gp_ref) < tol


def random_inputs(cfg, batch, seq, prompt_len, seed=1, num_blocks=None):
    kx, kp = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch, seq, cfg.hidden_size), jnp.float32)
    n = num_blocks or cfg.num_hidden_layers
    prompts = 0.5 * jax.random.normal(kp, (n, batch, prompt_len, cfg.hidden_size), jnp.float32)
    return x, prompts


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tiny_cfg):
    """A real sharded safetensors checkpoint of a tiny random Llama, and its blocks."""
    from jaxseq.checkpoint import load_checkpoint, random_checkpoint

    path = random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", tiny_cfg, seed=3, max_shard_bytes=40_000)
    cfg, params = load_checkpoint(path)
    return path, cfg, params


_prefixes = itertools.count()


@pytest.fixture
def start_servers(checkpoint):
    """``start_servers([(0, 2), (2, 4)], prefix=...)`` starts real servers (the first starts the swarm).

    Every process started is killed by PID at teardown, whatever the test did.
    """
    started: list[ServerProcess] = []

    def start(spans, dht_prefix=None, initial_peers=None, extra_args=()):
        dht_prefix = dht_prefix or f"tiny{next(_prefixes)}"

        def launch(span, peers):
            args = ["--throughput", "1000", "--update-period", "5", *extra_args]
            server = ServerProcess(str(checkpoint[0]), span, dht_prefix, peers, args)
            started.append(server)
            return server

        servers = []
        if not initial_peers:  # the first server starts the swarm; the others join it, starting in parallel
            servers.append(launch(spans[0], None).wait_ready())
            initial_peers, spans = [servers[0].maddr], spans[1:]
        servers += [server.wait_ready() for server in [launch(span, initial_peers) for span in spans]]
        return servers, dht_prefix

    yield start
    for server in started:
        server.kill()
