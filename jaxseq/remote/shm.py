"""Same-host tensor exchange through sealed memory files: a jaxseq extension to Petals' protocol.

When a jaxseq client and a jaxseq server run on one machine (the server announces this machine's
``host_id``), a request carries no tensor bytes. The client keeps a pool of memory files
(``memfd``), writes its inputs into one, and names in the request's metadata its process id, the
files, and where the inputs are and where the results must go. The server maps the files once
(mappings are cached), reads the inputs in place and writes the results in place; the client hands
the results on as views of its file, which goes back to the pool when the last view is released.
That is one memory copy each way, instead of serialization through two p2pd daemons and a socket.

The files are sealed against resizing, so a client can't make a server fault (SIGBUS) by
truncating a mapped file, and a server maps only sealed files owned by its own user. Petals peers
never see any of this: Petals servers don't announce a host id, Petals clients never send the key.

Example (both sides in one process here; normally the server side runs in the server):
    >>> pool = SegmentPool()
    >>> exchange = pool.exchange([np.ones((2, 3), np.float32)], [((2, 3), np.float32)])
    >>> inputs, outputs = ServerMappings().arrays(exchange.spec)
    >>> outputs[0][...] = 2 * inputs[0]
    >>> exchange.results()[0].tolist()
    [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import mmap
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Optional, Sequence

import ml_dtypes
import numpy as np

from jaxseq.memory import ALIGNMENT, MemoryPool, close_mapping, nbytes, round_up, view
from jaxseq.remote.protocol import ProtocolError

METADATA_KEY = "jaxseq_shm"  # {"pid", "segments": [[fd, inode, size]], "inputs"/"outputs": [[segment, offset, dtype, shape]]}
HOST_KEY = "jaxseq_host"  # in a server's DHT record: the machine (and pid namespace) it runs on
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_MAX_NDIM = 4


def host_id() -> Optional[str]:
    """This machine's identity for the current boot and pid namespace, or None where memfds can't be shared."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{pid_namespace}" if hasattr(os, "memfd_create") else None


@dataclasses.dataclass(eq=False)
class _Segment:
    """A sealed memory file of the client's and its mapping."""

    fd: int
    inode: int
    size: int
    mapping: mmap.mmap

    @classmethod
    def create(cls, size: int) -> "_Segment":
        fd = os.memfd_create("jaxseq", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
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

    def __init__(self, pool: "SegmentPool", inputs: Sequence[np.ndarray], outputs: Sequence[tuple[tuple, np.dtype]]):
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
        results = [view(owner, o, _DTYPES[d], s) for _, o, d, s in self._outputs]
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
        places.append([segment, offset, np.dtype(dtype).name, [int(d) for d in shape]])
        offset = round_up(offset + nbytes(shape, dtype), ALIGNMENT)
    return places, offset


class SegmentPool(MemoryPool[_Segment]):
    """The client's memory files, reused across calls (see ``jaxseq.memory``)."""

    def __init__(self, max_idle: int = 8):
        super().__init__(_Segment.create, max_idle)

    def exchange(self, inputs: Sequence[np.ndarray], outputs: Sequence[tuple[tuple, np.dtype]]) -> Exchange:
        """Segments holding ``inputs`` and room for results of the given shapes and dtypes."""
        return Exchange(self, inputs, outputs)


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
            raise ProtocolError("a shared-memory spec must be a map with the client's pid")
        segments = spec.get("segments")
        if not isinstance(segments, list) or len(segments) > 2:
            raise ProtocolError("a shared-memory spec names at most 2 segments as [fd, inode, size]")
        mappings = [self._mapping(spec["pid"], segment) for segment in segments]
        inputs, outputs = spec.get("inputs", []), spec.get("outputs", [])
        if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) + len(outputs) > 8:
            raise ProtocolError("shared-memory inputs and outputs must be lists of at most 8 places in all")
        inputs, outputs = [_place(p, mappings) for p in inputs], [_place(p, mappings) for p in outputs]
        if sum(nbytes(shape, dtype) for _, _, dtype, shape in inputs) > self.max_bytes:
            raise ProtocolError(f"shared-memory inputs exceed this server's limit of {self.max_bytes} bytes")
        return [view(*place) for place in inputs], [view(*place) for place in outputs]

    def _mapping(self, pid: int, segment) -> mmap.mmap:
        if not (isinstance(segment, list) and len(segment) == 3 and all(isinstance(v, int) and v >= 0 for v in segment)):
            raise ProtocolError(f"a shared-memory segment must be [fd, inode, size], got {segment!r:.80}")
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
        raise ProtocolError(f"shared-memory segment {pid}/{fd} can't be opened: {error.strerror}") from None
    try:
        info = os.fstat(own)
        if not stat.S_ISREG(info.st_mode) or info.st_ino != inode or info.st_size != size or size == 0:
            raise ProtocolError(f"shared-memory segment {pid}/{fd} is not the file of {size} bytes the request names")
        if info.st_uid != os.geteuid():
            raise ProtocolError(f"shared-memory segment {pid}/{fd} belongs to another user")
        try:
            seals = fcntl.fcntl(own, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if seals & _SEALS != _SEALS:
            raise ProtocolError(f"shared-memory segment {pid}/{fd} is not sealed against resizing")
        return mmap.mmap(own, size)
    finally:
        os.close(own)


def _place(place, mappings: list[mmap.mmap]) -> tuple[mmap.mmap, int, np.dtype, tuple[int, ...]]:
    """Validate ``[segment, offset, dtype, shape]`` from a peer against the mapped segments."""
    if not (isinstance(place, list) and len(place) == 4):
        raise ProtocolError(f"a shared-memory place must be [segment, offset, dtype, shape], got {place!r:.100}")
    segment, offset, dtype, shape = place
    if not (isinstance(segment, int) and 0 <= segment < len(mappings)):
        raise ProtocolError(f"shared-memory place names segment {segment!r:.20}, but the spec has {len(mappings)}")
    if dtype not in _DTYPES:
        raise ProtocolError(f"shared-memory dtype {dtype!r:.40} is not one of {sorted(_DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(isinstance(d, int) and 0 <= d < 2**31 for d in shape)):
        raise ProtocolError(f"shared-memory shape {shape!r:.80} is invalid")
    dtype = np.dtype(_DTYPES[dtype])
    mapping = mappings[segment]
    if not (isinstance(offset, int) and offset >= 0 and offset % ALIGNMENT == 0) or offset + nbytes(shape, dtype) > len(mapping):
        raise ProtocolError(f"shared-memory place at offset {offset!r:.20} does not fit its segment")
    return mapping, offset, dtype, tuple(shape)


def write(places: Sequence[np.ndarray], arrays: Sequence[np.ndarray]) -> None:
    """Write results into the places a client made for them; shapes must match."""
    if len(places) != len(arrays):
        raise ProtocolError(f"the request has room for {len(places)} results, there are {len(arrays)}")
    for place, array in zip(places, arrays):
        if place.shape != array.shape:
            raise ProtocolError(f"a result place is for shape {list(place.shape)}, the result is {list(array.shape)}")
        np.copyto(place, array, casting="same_kind")
