"""Shared fixtures: a tiny Llama and in-process swarms built from it."""

from __future__ import annotations

import itertools

import jax
import pytest

import jaxseq
from jaxseq.testing.launch import ServerProcess

from helpers import TINY


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
