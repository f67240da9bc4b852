"""Pooled host memory (``jaxseq.memory``): aligned, reused once its arrays are gone, bounded, adopted by JAX."""

from __future__ import annotations

import gc

import jax
import numpy as np
import pytest

from jaxseq.memory import ALIGNMENT, GRANULE, MemoryPool, PrivateMemory


@pytest.fixture
def pool():
    pool = MemoryPool(PrivateMemory.create, max_idle=2)
    yield pool
    pool.close()


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


@pytest.mark.parametrize("shape", [(0,), (3,), (2, 5, 7), (1 << 20,), (3, GRANULE + 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64])
def test_arrays_are_aligned_writable_and_of_their_shape(pool, shape, dtype):
    a = pool.empty(shape, dtype)
    assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    assert _address(a) % ALIGNMENT == 0
    a[...] = 1
    assert (a == 1).all()


def test_memory_is_reused_only_after_every_view_is_gone(pool):
    a = pool.empty((256, 1024), np.float32)
    where, view = _address(a), a[1:, :3]
    del a
    gc.collect()
    b = pool.empty((256, 1024), np.float32)
    assert _address(b) != where  # a view was still alive
    del view, b
    gc.collect()
    assert where in {_address(pool.empty((256, 1024), np.float32)) for _ in range(2)}


def test_idle_memory_is_bounded(pool):
    closed = []
    pool.create = lambda size: _Tracked(PrivateMemory.create(size), closed)
    arrays = [pool.empty((GRANULE * (i + 1),), np.uint8) for i in range(4)]
    del arrays
    gc.collect()
    assert len(closed) == 2  # max_idle
    pool.close()
    assert len(closed) == 4


class _Tracked:
    def __init__(self, memory: PrivateMemory, closed: list):
        self.size, self.mapping, self._memory, self._closed = memory.size, memory.mapping, memory, closed

    def close(self) -> None:
        self._closed.append(self.size)
        self._memory.close()


def test_jax_on_a_cpu_adopts_pooled_memory_and_gives_it_back(pool):
    """What makes staging a server's inputs a single copy: device_put aliases the pooled array, and
    the memory returns to the pool once the JAX array is gone, not before."""
    cpu = jax.devices("cpu")[0]
    host = pool.empty((64, 512), np.float32)
    host[...] = np.arange(host.size, dtype=np.float32).reshape(host.shape)
    where = _address(host)
    on_device = jax.device_put(host, cpu)
    assert on_device.unsafe_buffer_pointer() == where
    del host
    gc.collect()
    assert _address(pool.empty((64, 512), np.float32)) != where  # JAX still holds it
    np.testing.assert_array_equal(np.asarray(on_device)[1], np.arange(512, 1024, dtype=np.float32))
    del on_device
    gc.collect()
    assert where in {_address(pool.empty((64, 512), np.float32)) for _ in range(2)}
