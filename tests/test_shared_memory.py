"""Same-host shared-memory transfers: validated by servers, reused and released by clients, equal results."""

from __future__ import annotations

import copy
import gc
import os
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxseq
from jaxseq import RemoteSequenceManager
from jaxseq.client.shm import SegmentPool
from jaxseq.remote.protocol import ProtocolError
from jaxseq.server.shm import ServerMappings, write

from helpers import rel_err


def _open_segments() -> int:
    """The memory files this process has open (pooled or in use; a mapping holds a second descriptor)."""
    fds = [p for p in Path("/proc/self/fd").iterdir() if p.exists() and os.readlink(p).startswith("/memfd:jaxseq")]
    return len({p.stat().st_ino for p in fds})


@pytest.fixture
def pool():
    pool = SegmentPool(max_idle=2)
    yield pool
    pool.close()


def test_round_trip_in_place_and_segments_are_reused(pool):
    rng = np.random.default_rng(0)
    x, prompts = rng.standard_normal((2, 3, 8)).astype(np.float32), rng.standard_normal((1, 2, 1, 8)).astype(np.float32)
    exchange = pool.exchange([x, prompts], [((2, 3, 8), np.float32)])
    (got_x, got_prompts), (place,) = ServerMappings().arrays(copy.deepcopy(exchange.spec))
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_prompts, prompts)
    write([place], [2 * got_x])
    (result,) = exchange.results()
    np.testing.assert_array_equal(result, 2 * x)
    assert not result.flags.writeable
    segments = exchange.spec["segments"]
    del result
    gc.collect()
    again = pool.exchange([x, prompts], [((2, 3, 8), np.float32)])
    assert again.spec["segments"] == segments  # both segments came back to the pool and were reused
    again.discard()


def test_pool_bounds_idle_segments_and_closes_them(pool):
    before = _open_segments()
    exchanges = [pool.exchange([np.zeros(4 << 10 * i, np.float32)], [((1,), np.float32)]) for i in range(3)]
    results = [e.results() for e in exchanges]
    del results
    gc.collect()
    assert _open_segments() - before == 2  # max_idle
    pool.close()
    assert _open_segments() == before


def test_a_discarded_exchange_can_still_be_written_by_the_server(pool):
    exchange = pool.exchange([np.ones((2, 2), np.float32)], [((2, 2), np.float32)])
    mappings = ServerMappings()
    _, (place,) = mappings.arrays(exchange.spec)  # mapped before the client gave up
    exchange.discard()
    write([place], [np.zeros((2, 2), np.float32)])  # the mapping outlives the client's file descriptor
    with pytest.raises(ProtocolError, match="can't be opened|not the file"):
        ServerMappings().arrays(exchange.spec)


def test_segments_cannot_be_shrunk_under_a_server(pool):
    exchange = pool.exchange([np.ones(16, np.float32)], [((16,), np.float32)])
    fd = exchange.spec["segments"][0][0]
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)
    exchange.discard()


def _set(*path_and_value):
    """A change to a spec: ``_set("inputs", 0, 1, 64)`` sets ``spec["inputs"][0][1] = 64``."""
    *path, value = path_and_value

    def change(spec):
        for key in path[:-1]:
            spec = spec[key]
        spec[path[-1]] = value

    return change


@pytest.mark.parametrize(
    "change,message",
    [
        (_set("pid", "me"), "pid"),
        (_set("pid", -1), "pid"),
        (_set("segments", "all"), "at most 2 segments"),
        (_set("segments", 0, [1, 2]), "must be \\[fd, inode, size\\]"),
        (_set("segments", 0, 0, 10**6), "can't be opened"),
        (_set("segments", 0, 1, 1), "is not the file"),
        (_set("segments", 0, 2, 1 << 20), "is not the file"),
        (_set("inputs", 0, 0, 5), "names segment 5"),
        (_set("inputs", 0, 1, 1 << 16), "does not fit"),
        (_set("inputs", 0, 1, 4), "does not fit"),
        (_set("inputs", 0, 2, "object"), "dtype"),
        (_set("inputs", 0, 3, [2, -1]), "shape"),
        (_set("inputs", 0, 3, [1 << 20]), "does not fit"),
        (_set("inputs", [[0, 0, "float32", [2]]] * 9), "at most 8"),
        (_set("inputs", "x"), "must be lists"),
        (_set("outputs", 0, "x"), "must be \\[segment"),
    ],
)
def test_servers_reject_bad_specs(pool, change, message):
    exchange = pool.exchange([np.ones((2, 2), np.float32)], [((2, 2), np.float32)])
    spec = copy.deepcopy(exchange.spec)
    change(spec)
    try:
        with pytest.raises(ProtocolError, match=message):
            ServerMappings().arrays(spec)
    finally:
        exchange.discard()


def test_servers_reject_files_that_could_shrink(pool):
    exchange = pool.exchange([np.ones((2, 2), np.float32)], [((2, 2), np.float32)])
    fd = os.memfd_create("jaxseq")
    try:
        os.ftruncate(fd, 1 << 16)
        spec = {**exchange.spec, "segments": [[fd, os.fstat(fd).st_ino, 1 << 16]] * 2}
        with pytest.raises(ProtocolError, match="not sealed against resizing"):
            ServerMappings().arrays(spec)
    finally:
        os.close(fd)
        exchange.discard()


def test_servers_reject_segments_of_another_process(pool):
    exchange = pool.exchange([np.ones((2, 2), np.float32)], [((2, 2), np.float32)])
    spec = {**exchange.spec, "pid": os.getppid()}
    with pytest.raises(ProtocolError, match="can't be opened|not the file"):
        ServerMappings().arrays(spec)
    exchange.discard()


def test_servers_limit_input_bytes_and_result_shapes(pool):
    exchange = pool.exchange([np.ones((64, 64), np.float32)], [((2, 2), np.float32)])
    with pytest.raises(ProtocolError, match="exceed this server's limit of 1000 bytes"):
        ServerMappings(max_bytes=1000).arrays(exchange.spec)
    _, places = ServerMappings().arrays(exchange.spec)
    with pytest.raises(ProtocolError, match="for shape \\[2, 2\\], the result is \\[3, 3\\]"):
        write(places, [np.zeros((3, 3), np.float32)])
    with pytest.raises(ProtocolError, match="room for 1 results, there are 2"):
        write(places, [np.zeros((2, 2), np.float32)] * 2)
    exchange.discard()


@pytest.fixture(scope="module")
def two_servers(module_servers):
    """Blocks 0:2 and 2:4 on two real servers, shared by both cases below (each counts the cache hits and misses
    of its own calls)."""
    return module_servers([(0, 2), (2, 4)])


@pytest.mark.network
@pytest.mark.parametrize("shared_memory", [True, False])
def test_same_host_calls_equal_wire_calls(checkpoint, two_servers, shared_memory):
    _, cfg, params = checkpoint
    servers, prefix = two_servers
    before = _open_segments()
    # client-driven both ways: over the wire, server-to-server hops would change what each call carries
    config = jaxseq.ClientConfig(shared_memory=shared_memory, server_to_server=False)
    with RemoteSequenceManager([servers[0].maddr], prefix, config) as manager:
        cache_before = {s.peer_id: manager.server_info(s.peer_id)["jaxseq_cache"] for s in servers}  # the other case's
        x = jax.random.normal(jax.random.key(0), (3, 9, cfg.hidden_size))
        prompts = 0.5 * jax.random.normal(jax.random.key(1), (4, 3, 2, cfg.hidden_size))
        f = lambda x, p: jax.numpy.sum(jax.numpy.sin(jaxseq.remote_sequential(x, p, manager)))  # noqa: E731
        g = lambda x, p: jax.numpy.sum(jax.numpy.sin(jaxseq.local_sequential(cfg, params, x, p)))  # noqa: E731
        step = jax.jit(jax.grad(f, argnums=(0, 1)))
        for scale in (1.0, 2.0, 1.0):  # reused segments must not leak one step's values into the next
            got = step(scale * x, prompts)
            want = jax.grad(g, argnums=(0, 1))(scale * x, prompts)
            assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, want))
        assert [t.transport for t in manager.timings] == ["shm" if shared_memory else "unary"] * 12
        # Backward requests carry the grad outputs alone: the servers kept the forwards' inputs.
        assert {t.bytes_sent for t in manager.timings if t.stage == "backward"} == {x.size * 4}
        for record in manager.records:  # every backward found its forward's activations (none recomputed)
            cache = manager.server_info(record.peer)["jaxseq_cache"]
            assert {key: cache[key] - cache_before[record.peer][key] for key in cache} == {"hits": 3, "misses": 0}
    gc.collect()
    assert _open_segments() == before
