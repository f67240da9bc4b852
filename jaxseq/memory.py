"""Host memory reused across calls: pages already faulted in are several times faster to fill.

The first write to new memory takes a page fault per page, so a copy into new pages runs several
times slower than into pages used before (``docs/benchmarks.md`` has the figures). So clients keep
their shared-memory segments in a pool (``jaxseq.client.shm``), and servers the memory they stage
inputs in (``jaxseq.server.backend``): both sides use this module. Memory is handed out as numpy
arrays, and goes back to its pool when the array and every view of it are gone (JAX's, where it
adopted the array, included).

Example:
    >>> pool = MemoryPool(PrivateMemory.create)
    >>> a = pool.empty((2, 3), np.float32)
    >>> a.shape, a.ctypes.data % ALIGNMENT
    ((2, 3), 0)
"""

from __future__ import annotations

import collections
import dataclasses
import mmap
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

import numpy as np

# JAX's CPU backend adopts host memory aligned to this many bytes (``jax.device_put`` aliases it
# instead of copying); numpy's own large allocations are only 16-byte aligned.
ALIGNMENT = 64
GRANULE = 1 << 16  # sizes are rounded up to this, so that similar requests reuse memory


class Memory(Protocol):
    size: int
    mapping: mmap.mmap

    def close(self) -> None: ...


M = TypeVar("M", bound=Memory)


def round_up(n: int, multiple: int) -> int:
    """The least multiple of ``multiple`` that is at least ``n``."""
    return -(-n // multiple) * multiple


def nbytes(shape: Sequence[int], dtype) -> int:
    """Bytes of an array of ``shape`` and ``dtype``."""
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def view(memory, offset: int, dtype, shape: Sequence[int]) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` over the bytes of ``memory`` (a mapping or an array) from ``offset``;
    it keeps ``memory`` alive."""
    return np.frombuffer(memory, np.uint8, nbytes(shape, dtype), offset).view(dtype).reshape(shape)


def close_mapping(mapping: mmap.mmap) -> None:
    """Unmap now, or, while arrays over the mapping are alive, when the last of them goes."""
    try:
        mapping.close()
    except BufferError:
        pass


@dataclasses.dataclass(eq=False)
class PrivateMemory:
    """Anonymous memory of this process, in huge pages where the kernel allows (fewer faults and TLB misses)."""

    size: int
    mapping: mmap.mmap

    @classmethod
    def create(cls, size: int) -> PrivateMemory:
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):  # no such advice on this platform or kernel: ordinary pages
            pass
        return cls(size, mapping)

    def close(self) -> None:
        close_mapping(self.mapping)


class MemoryPool(Generic[M]):
    """Memory made by ``create(size)``, reused: ``max_idle`` bounds the unused pieces kept, and the
    least recently used beyond it are closed.

    Memory comes back from garbage collection (when the last array over it dies), which can run
    inside any allocation, also one under the pool's lock: then it waits in a lock-free queue.
    """

    def __init__(self, create: Callable[[int], M], max_idle: int = 8):
        self.create = create
        self.max_idle = max_idle
        self._idle: collections.OrderedDict[M, None] = collections.OrderedDict()
        self._returned: collections.deque[M] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self, size: int) -> M:
        """Idle memory of at least ``size`` bytes (and at most twice that), or new memory."""
        size = max(GRANULE, round_up(size, GRANULE))
        with self._lock:
            self._take_returned()
            fits = [m for m in self._idle if size <= m.size <= 2 * size]
            if fits:
                memory = min(fits, key=lambda m: m.size)
                del self._idle[memory]
                return memory
        return self.create(size)

    def release(self, memory: M) -> None:
        self._returned.append(memory)
        if self._closed:
            self._close_returned()
        elif self._lock.acquire(blocking=False):  # else whoever holds it, or the next acquire, takes it in
            try:
                self._take_returned()
            finally:
                self._lock.release()

    def lend(self, memory: M) -> np.ndarray:
        """All of ``memory`` as bytes; it comes back to the pool when this array and its views are gone."""
        owner = np.frombuffer(memory.mapping, np.uint8)
        weakref.finalize(owner, self.release, memory)
        return owner

    def empty(self, shape: Sequence[int], dtype) -> np.ndarray:
        """An uninitialized array in pooled memory (page-aligned), back in the pool when it and its views are gone."""
        return view(self.lend(self.acquire(nbytes(shape, dtype))), 0, dtype, shape)

    def _take_returned(self) -> None:
        while self._returned:
            self._idle[self._returned.popleft()] = None
        while len(self._idle) > self.max_idle:
            self._idle.popitem(last=False)[0].close()

    def _close_returned(self) -> None:
        while True:
            try:
                self._returned.popleft().close()
            except IndexError:
                return

    def close(self) -> None:
        """Close the idle memory; memory still in use closes when released."""
        self._closed = True
        self._close_returned()
        with self._lock:
            idle, self._idle = list(self._idle), collections.OrderedDict()
        for memory in idle:
            memory.close()
