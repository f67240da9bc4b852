"""The client's half of same-host tensor exchange (``jaxseq.remote.shm``): a pool of sealed memory
files, and one call's inputs written into them with room for its results.

Example:
    >>> pool = SegmentPool()
    >>> exchange = pool.exchange([np.ones((2, 3), np.float32)], [((2, 3), np.float32)])
    >>> sorted(exchange.spec)
    ['inputs', 'outputs', 'pid', 'segments']
    >>> exchange.discard(); pool.close()
"""

from __future__ import annotations

import dataclasses
import fcntl
import mmap
import os
from collections.abc import Sequence

import numpy as np

from jaxseq.arrays import FLOAT_DTYPES, dtype_name
from jaxseq.memory import ALIGNMENT, MemoryPool, close_mapping, nbytes, round_up, view
from jaxseq.remote.shm import SEALS


@dataclasses.dataclass(eq=False)
class _Segment:
    """A sealed memory file of the client's and its mapping."""

    fd: int
    inode: int
    size: int
    mapping: mmap.mmap

    @classmethod
    def create(cls, size: int) -> _Segment:
        fd = os.memfd_create("jaxseq", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS | fcntl.F_SEAL_SEAL)
            return cls(fd, os.fstat(fd).st_ino, size, mmap.mmap(fd, size))
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        close_mapping(self.mapping)
        os.close(self.fd)


class Exchange:
    """One call's segments (one for the inputs, one for the results) and its metadata ``spec``.

    After the server replies, ``results()`` gives the results as read-only views (the input segment
    goes back to the pool at once, the result segment when the last view is released). If the
    call fails or is abandoned, ``discard()`` closes both instead: the server may still write.
    """

    def __init__(self, pool: SegmentPool, inputs: Sequence[np.ndarray], outputs: Sequence[tuple[tuple, np.dtype]]):
        self._pool = pool
        in_places, in_size = _layout([(a.shape, a.dtype) for a in inputs], segment=0)
        out_places, out_size = _layout(outputs, segment=1)
        self._segments = [pool.acquire(in_size)]
        try:
            self._segments.append(pool.acquire(out_size))
            for (_, offset, _, _), array in zip(in_places, inputs):
                np.copyto(view(self._segments[0].mapping, offset, array.dtype, array.shape), array)
        except BaseException:
            self.discard()
            raise
        self._outputs = out_places
        self.spec = {
            "pid": os.getpid(),
            "segments": [[s.fd, s.inode, s.size] for s in self._segments],
            "inputs": in_places,
            "outputs": out_places,
        }

    def results(self) -> list[np.ndarray]:
        inputs, outputs = self._segments
        self._pool.release(inputs)
        owner = self._pool.lend(outputs)
        results = [view(owner, o, FLOAT_DTYPES[d], s) for _, o, d, s in self._outputs]
        for result in results:
            result.flags.writeable = False
        self._segments = []
        return results

    def discard(self) -> None:
        for segment in self._segments:
            segment.close()
        self._segments = []


def _layout(arrays: Sequence[tuple[tuple, np.dtype]], segment: int) -> tuple[list, int]:
    """Places ``[segment, offset, dtype, shape]`` of ``arrays`` packed into one segment, and its size."""
    places, offset = [], 0
    for shape, dtype in arrays:
        places.append([segment, offset, dtype_name(dtype), [int(d) for d in shape]])
        offset = round_up(offset + nbytes(shape, dtype), ALIGNMENT)
    return places, offset


class SegmentPool(MemoryPool[_Segment]):
    """The client's memory files, reused across calls (see ``jaxseq.memory``)."""

    def __init__(self, max_idle: int = 8):
        super().__init__(_Segment.create, max_idle)

    def exchange(self, inputs: Sequence[np.ndarray], outputs: Sequence[tuple[tuple, np.dtype]]) -> Exchange:
        """Segments holding ``inputs`` and room for results of the given shapes and dtypes."""
        return Exchange(self, inputs, outputs)
