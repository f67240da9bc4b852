"""Same-host tensor exchange through ``/dev/shm``: a jaxseq extension to Petals' protocol.

When a jaxseq client and a jaxseq server run on one machine (the server announces its ``host_id``),
the request carries no tensor bytes: the client writes its tensors into files in ``/dev/shm``,
creates the files for the results, and names them all in the request's metadata; the server reads
the inputs and writes the results in place. That is a few memory copies instead of serialization
through two p2pd daemons and a socket. The client owns every file and removes them after the call.
Petals peers never see this: Petals servers don't announce a host id, Petals clients never send it.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Optional, Sequence

import ml_dtypes
import numpy as np

from jaxseq.remote.protocol import ProtocolError

SHM_DIR = Path("/dev/shm")
METADATA_KEY = "jaxseq_shm"  # {"inputs": [[name, dtype, shape], ...], "outputs": [...]}
HOST_KEY = "jaxseq_host"  # in a server's DHT record: the machine it runs on
_NAME = re.compile(r"jaxseq-[0-9a-f]{32}")
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}
_MAX_NDIM = 4


def host_id() -> Optional[str]:
    """This machine's identity for the current boot, or None where ``/dev/shm`` can't be used."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}" if SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK) else None


def _descriptor(name: str, shape, dtype) -> list:
    return [name, np.dtype(dtype).name, list(shape)]


def _parse(descriptor) -> tuple[Path, np.dtype, tuple[int, ...]]:
    """Validate a descriptor from a peer: a jaxseq file name, a float dtype, a small non-negative shape."""
    if not (isinstance(descriptor, (list, tuple)) and len(descriptor) == 3):
        raise ProtocolError(f"shared-memory descriptor must be [name, dtype, shape], got {descriptor!r:.100}")
    name, dtype, shape = descriptor
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ProtocolError(f"shared-memory name {name!r:.80} is not a jaxseq segment name")
    if dtype not in _DTYPES:
        raise ProtocolError(f"shared-memory dtype {dtype!r:.40} is not one of {sorted(_DTYPES)}")
    if not (isinstance(shape, (list, tuple)) and len(shape) <= _MAX_NDIM and all(isinstance(d, int) and 0 <= d < 2**31 for d in shape)):
        raise ProtocolError(f"shared-memory shape {shape!r:.80} is invalid")
    return SHM_DIR / name, np.dtype(_DTYPES[dtype]), tuple(shape)


def _open(path: Path, dtype: np.dtype, shape: tuple[int, ...], flags: int) -> tuple[int, int]:
    """An fd on the segment and its size in bytes, which must be exactly what ``shape`` and ``dtype`` take."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW)
    except OSError as error:
        raise ProtocolError(f"shared-memory segment {path.name} can't be opened: {error.strerror}") from None
    if os.fstat(fd).st_size != nbytes:
        os.close(fd)
        raise ProtocolError(f"shared-memory segment {path.name} does not hold {nbytes} bytes")
    return fd, nbytes


def _read(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    fd, nbytes = _open(path, dtype, shape, os.O_RDONLY)
    try:
        array = np.empty(shape, dtype)
        view, done = memoryview(array).cast("B"), 0
        while done < nbytes:
            n = os.readv(fd, [view[done:]])
            if n == 0:
                raise ProtocolError(f"shared-memory segment {path.name} ended early")
            done += n
        return array
    finally:
        os.close(fd)


def _write(path: Path, array: np.ndarray, flags: int = os.O_WRONLY) -> None:
    fd, _ = _open(path, array.dtype, array.shape, flags)
    try:
        data, done = memoryview(np.ascontiguousarray(array)).cast("B"), 0
        while done < len(data):
            done += os.write(fd, data[done:])
    finally:
        os.close(fd)


def read(descriptors: Sequence) -> list[np.ndarray]:
    """The arrays a peer placed in shared memory (copied out)."""
    return [_read(*_parse(descriptor)) for descriptor in descriptors]


def write(descriptors: Sequence, arrays: Sequence[np.ndarray]) -> None:
    """Write results into the segments a peer created for them; shapes and dtypes must match."""
    if len(descriptors) != len(arrays):
        raise ProtocolError(f"the request names {len(descriptors)} result segments for {len(arrays)} results")
    for descriptor, array in zip(descriptors, arrays):
        path, dtype, shape = _parse(descriptor)
        if shape != array.shape:
            raise ProtocolError(f"result segment {path.name} is for shape {list(shape)}, the result is {list(array.shape)}")
        _write(path, array.astype(dtype, copy=False))


class Segments:
    """The client's side of one call: segments holding its inputs and awaiting the results; removed on exit."""

    def __init__(self, inputs: Sequence[np.ndarray], outputs: Sequence[tuple[tuple[int, ...], np.dtype]]):
        self._paths: list[Path] = []
        try:
            self.inputs = [self._create(a.shape, a.dtype, a) for a in inputs]
            self.outputs = [self._create(shape, dtype) for shape, dtype in outputs]
        except BaseException:
            self.close()
            raise

    def _create(self, shape, dtype, array: Optional[np.ndarray] = None) -> list:
        name = f"jaxseq-{uuid.uuid4().hex}"
        path = SHM_DIR / name
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._paths.append(path)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        if array is not None:
            _write(path, array)
        return _descriptor(name, shape, dtype)

    def results(self) -> list[np.ndarray]:
        return read(self.outputs)

    def close(self) -> None:
        for path in self._paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def __enter__(self) -> "Segments":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
