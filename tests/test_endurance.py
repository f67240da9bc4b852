"""Many clients at once, and long runs: correct, no deadlock, memory and resources flat."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import psutil
import pytest

import jaxseq
from jaxseq import RemoteSequenceManager

RSS_BOUND = 48 * 2**20  # growth allowed between a warmed-up point and the end of a long run


def _train(manager, cfg, steps):
    step = jax.jit(jax.grad(lambda x, p: jnp.sum(jnp.sin(jaxseq.remote_sequential(x, p, manager))), argnums=(0, 1)))
    x = jax.random.normal(jax.random.key(0), (2, 8, cfg.hidden_size))
    prompts = 0.5 * jax.random.normal(jax.random.key(1), (cfg.num_hidden_layers, 2, 2, cfg.hidden_size))
    for _ in range(steps):
        jax.block_until_ready(step(x, prompts))


def _p2pd_descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.name() == "p2pd"}


@pytest.mark.network
def test_eight_concurrent_clients(checkpoint, start_servers):
    path = checkpoint[0]
    servers, prefix = start_servers([(0, 4), (0, 2), (2, 4)])
    script = Path(__file__).parent / "programs" / "concurrent_client.py"
    clients = [
        subprocess.Popen(
            [sys.executable, str(script), servers[0].maddr, prefix, str(path), "50", str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for seed in range(8)
    ]
    try:
        outputs = [client.communicate(timeout=900) for client in clients]
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
    for client, (stdout, stderr) in zip(clients, outputs):
        assert client.returncode == 0, stderr[-3000:]
        result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
        assert result["steps"] == 50 and result["worst_rel_err"] < 1e-5
        assert "Error" not in stderr, stderr[-3000:]  # nothing surfaced to the user, not even as a warning


def test_local_swarm_1000_steps_flat(tiny_cfg, make_swarm):
    swarm, manager = make_swarm([(0, 2), (2, 4)])
    process = psutil.Process()
    _train(manager, tiny_cfg, 100)
    rss, threads = process.memory_info().rss, process.num_threads()
    # The emulated servers compute in asyncio's default executor, which starts its (bounded) workers
    # lazily, when calls happen to overlap: those may still appear, nothing else may.
    executor = manager._background.loop._default_executor
    headroom = executor._max_workers - len(executor._threads)
    _train(manager, tiny_cfg, 900)
    assert process.memory_info().rss - rss < RSS_BOUND
    assert process.num_threads() <= threads + headroom
    assert len(manager.saved) == 0
    assert all(len(s.backend.cache) == 0 for s in swarm.servers)


@pytest.mark.network
def test_loopback_200_steps_flat_and_clean(checkpoint, start_servers):
    _, cfg, _ = checkpoint
    servers, prefix = start_servers([(0, 2), (2, 4)])
    server_processes = [psutil.Process(s.process.pid) for s in servers]
    me = psutil.Process()
    with RemoteSequenceManager([servers[0].maddr], prefix):
        pass  # hivemind starts a few process-wide helper threads once, on first use
    p2pd_before, threads_before = _p2pd_descendants(), threading.active_count()
    with RemoteSequenceManager([servers[0].maddr], prefix) as manager:
        _train(manager, cfg, 50)
        rss = [me.memory_info().rss] + [p.memory_info().rss for p in server_processes]
        fds, threads = me.num_fds(), me.num_threads()
        _train(manager, cfg, 150)
        rss_after = [me.memory_info().rss] + [p.memory_info().rss for p in server_processes]
        assert all(after - before < RSS_BOUND for before, after in zip(rss, rss_after)), (rss, rss_after)
        assert me.num_fds() <= fds + 2 and me.num_threads() <= threads
        assert len(manager.saved) == 0
    # Closing the manager left no p2pd, thread or socket behind.
    assert _p2pd_descendants() == p2pd_before
    assert threading.active_count() <= threads_before, [t.name for t in threading.enumerate()]
