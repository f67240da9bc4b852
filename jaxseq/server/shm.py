"""The server's half of same-host tensor exchange (``jaxseq.remote.shm``): it maps a client's sealed
memory files (checking that they are what the request says), gives views of the inputs and of the
places for the results, and writes the results there.

Every refusal here is a ``ProtocolError`` of kind ``ErrorKind.SHARED_MEMORY``: the client then sends
its tensors over the wire instead.

Example:
    >>> ServerMappings().arrays({"pid": 1, "segments": [["not", "a", "segment"]]})
    Traceback (most recent call last):
    ...
    jaxseq.remote.protocol.ProtocolError: jaxseq shared memory refused: a shared-memory segment must be ...
"""

from __future__ import annotations

import collections
import fcntl
import mmap
import os
import stat
import threading
from collections.abc import Sequence

import numpy as np

from jaxseq.arrays import FLOAT_DTYPES
from jaxseq.memory import ALIGNMENT, nbytes, view
from jaxseq.remote.protocol import ErrorKind, ProtocolError
from jaxseq.remote.shm import MAX_NDIM, MAX_PLACES, MAX_SEGMENTS, SEALS


def _refused(message: str) -> ProtocolError:
    return ProtocolError(message, ErrorKind.SHARED_MEMORY)


class ServerMappings:
    """A server's mappings of its clients' segments: made on first use, ``max_mappings`` kept (LRU)."""

    def __init__(self, max_mappings: int = 64, max_bytes: int = 1 << 30):
        self.max_mappings = max_mappings
        self.max_bytes = max_bytes
        self._mappings: collections.OrderedDict[tuple, mmap.mmap] = collections.OrderedDict()
        self._lock = threading.Lock()

    def arrays(self, spec) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Views of the request's inputs, and of the places its results go."""
        if not isinstance(spec, dict) or not isinstance(spec.get("pid"), int) or spec["pid"] <= 0:
            raise _refused("a shared-memory spec must be a map with the client's pid")
        segments = spec.get("segments")
        if not isinstance(segments, list) or len(segments) > MAX_SEGMENTS:
            raise _refused(f"a shared-memory spec names at most {MAX_SEGMENTS} segments as [fd, inode, size]")
        mappings = [self._mapping(spec["pid"], segment) for segment in segments]
        inputs, outputs = spec.get("inputs", []), spec.get("outputs", [])
        if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) + len(outputs) > MAX_PLACES:
            raise _refused(f"shared-memory inputs and outputs must be lists of at most {MAX_PLACES} places in all")
        inputs, outputs = [_place(p, mappings) for p in inputs], [_place(p, mappings) for p in outputs]
        if sum(nbytes(shape, dtype) for _, _, dtype, shape in inputs) > self.max_bytes:
            raise _refused(f"shared-memory inputs exceed this server's limit of {self.max_bytes} bytes")
        return [view(*place) for place in inputs], [view(*place) for place in outputs]

    def _mapping(self, pid: int, segment) -> mmap.mmap:
        if not (
            isinstance(segment, list) and len(segment) == 3 and all(isinstance(v, int) and v >= 0 for v in segment)
        ):
            raise _refused(f"a shared-memory segment must be [fd, inode, size], got {segment!r:.80}")
        key = (pid, *segment)
        with self._lock:
            if key in self._mappings:
                self._mappings.move_to_end(key)
                return self._mappings[key]
        mapping = _map_client_segment(pid, *segment)
        with self._lock:
            self._mappings[key] = mapping
            while len(self._mappings) > self.max_mappings:
                self._mappings.popitem(last=False)  # unmapped once no view of it is left
        return mapping


def _map_client_segment(pid: int, fd: int, inode: int, size: int) -> mmap.mmap:
    """Map the client's memory file, if it is what the client says and can't shrink under us."""
    try:
        own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        raise _refused(f"shared-memory segment {pid}/{fd} can't be opened: {error.strerror}") from None
    try:
        info = os.fstat(own)
        if not stat.S_ISREG(info.st_mode) or info.st_ino != inode or info.st_size != size or size == 0:
            raise _refused(f"shared-memory segment {pid}/{fd} is not the file of {size} bytes the request names")
        if info.st_uid != os.geteuid():
            raise _refused(f"shared-memory segment {pid}/{fd} belongs to another user")
        try:
            seals = fcntl.fcntl(own, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if seals & SEALS != SEALS:
            raise _refused(f"shared-memory segment {pid}/{fd} is not sealed against resizing")
        return mmap.mmap(own, size)
    finally:
        os.close(own)


def _place(place, mappings: list[mmap.mmap]) -> tuple[mmap.mmap, int, np.dtype, tuple[int, ...]]:
    """Validate ``[segment, offset, dtype, shape]`` from a peer against the mapped segments."""
    if not (isinstance(place, list) and len(place) == 4):
        raise _refused(f"a shared-memory place must be [segment, offset, dtype, shape], got {place!r:.100}")
    segment, offset, dtype, shape = place
    if not (isinstance(segment, int) and 0 <= segment < len(mappings)):
        raise _refused(f"shared-memory place names segment {segment!r:.20}, but the spec has {len(mappings)}")
    if dtype not in FLOAT_DTYPES:
        raise _refused(f"shared-memory dtype {dtype!r:.40} is not one of {sorted(FLOAT_DTYPES)}")
    if not (
        isinstance(shape, list) and len(shape) <= MAX_NDIM and all(isinstance(d, int) and 0 <= d < 2**31 for d in shape)
    ):
        raise _refused(f"shared-memory shape {shape!r:.80} is invalid")
    dtype = FLOAT_DTYPES[dtype]
    mapping = mappings[segment]
    if not (isinstance(offset, int) and offset >= 0 and offset % ALIGNMENT == 0) or offset + nbytes(shape, dtype) > len(
        mapping
    ):
        raise _refused(f"shared-memory place at offset {offset!r:.20} does not fit its segment")
    return mapping, offset, dtype, tuple(shape)


def write(places: Sequence[np.ndarray], arrays: Sequence[np.ndarray]) -> None:
    """Write results into the places a client made for them; shapes must match."""
    if len(places) != len(arrays):
        raise ProtocolError(f"the request has room for {len(places)} results, there are {len(arrays)}")
    for place, array in zip(places, arrays):
        if place.shape != array.shape:
            raise ProtocolError(f"a result place is for shape {list(place.shape)}, the result is {list(array.shape)}")
        np.copyto(place, array, casting="same_kind")
