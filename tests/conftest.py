"""Shared fixtures: a tiny Llama and in-process swarms built from it."""

from __future__ import annotations

import jax
import pytest

import jaxseq

from helpers import TINY, Swarms


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


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tiny_cfg):
    """A real sharded safetensors checkpoint of a tiny random Llama, and its blocks."""
    path = jaxseq.random_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny-llama", tiny_cfg, seed=3, max_shard_bytes=40_000
    )
    cfg, params = jaxseq.load_checkpoint(path)
    return path, cfg, params


@pytest.fixture(scope="session")
def hf_model(checkpoint):
    """The tiny checkpoint as a transformers model: the reference for generation."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint[0], dtype=torch.float32).eval()


@pytest.fixture
def start_servers(checkpoint):
    """``start_servers([(0, 2), (2, 4)], prefix=...)`` starts real servers of the tiny checkpoint (the first
    starts the swarm). Every process started is killed by PID at teardown, whatever the test did."""
    with Swarms(checkpoint[0]) as swarms:
        yield swarms.start


@pytest.fixture(scope="module")
def module_servers(checkpoint):
    """``start_servers`` for a whole module: what it starts serves every test of the module that asks for it (a
    server start costs seconds of imports), and is killed by PID after the module's last test. For servers the
    tests only use: none kills one, injects a fault, or compares a server's counters with absolute numbers
    another test's calls would change."""
    with Swarms(checkpoint[0]) as swarms:
        yield swarms.start
