"""The numpy arrays that cross between client and server: the dtypes they may have, and checks and
copies of them. Both sides use this module."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

# Every dtype a tensor may have on the wire or in shared memory, by the name hivemind and torch use.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(dtype)
    for name, dtype in [
        ("float32", np.float32),
        ("float16", np.float16),
        ("bfloat16", ml_dtypes.bfloat16),
        ("float64", np.float64),
        ("int64", np.int64),
        ("int32", np.int32),
        ("int16", np.int16),
        ("int8", np.int8),
        ("uint8", np.uint8),
        ("bool", np.bool_),
    ]
}
FLOAT_DTYPES: dict[str, np.dtype] = {
    name: dtype for name, dtype in DTYPES.items() if name.startswith(("float", "bfloat"))
}


def dtype_name(dtype: Any) -> str:
    """The name of ``dtype`` in ``DTYPES`` (as hivemind and torch spell it).

    Example:
        >>> dtype_name(ml_dtypes.bfloat16), dtype_name(np.float32)
        ('bfloat16', 'float32')
    """
    dtype = np.dtype(dtype)
    for name, known in DTYPES.items():
        if dtype == known:
            return name
    raise ValueError(f"dtype {dtype} can't cross the wire; use one of {sorted(DTYPES)}")


def is_floating(dtype: Any) -> bool:
    """Whether ``dtype`` is a floating dtype, bfloat16 included (numpy alone says it is not).

    Example:
        >>> is_floating(ml_dtypes.bfloat16), is_floating(np.int32)
        (True, False)
    """
    return np.dtype(dtype) in FLOAT_DTYPES.values()


def all_finite(array: np.ndarray) -> bool:
    """Whether every value of a floating ``array`` is finite.

    One pass that reads the array once decides, in all but rare cases: the dot product of a
    contiguous float32 or float64 array with itself (BLAS; squares can't cancel an infinity, and it
    reads faster than a sum, also from shared memory), or else a sum, in float32 for narrower
    floats (their own width would overflow, or be slow). Either is NaN or inf if any value is; only
    when it overflows does the exact check run, which also writes a mask a quarter the array's size.

    Example:
        >>> all_finite(np.array([1.0, np.inf])), all_finite(np.full(4, 3e38, np.float32))
        (False, True)
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if array.dtype in (np.float32, np.float64) and array.flags.c_contiguous:
            flat = array.reshape(-1)
            total = np.dot(flat, flat)
        else:
            total = np.add.reduce(array, axis=None, dtype=np.float32 if array.dtype.itemsize < 4 else None)
    return bool(np.isfinite(total)) or bool(np.isfinite(array).all())


def copy_padded(array: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out`` holding ``array`` (cast to ``out``'s dtype) in its leading corner and zeros in the
    rest: one pass over the data, where ``np.pad`` would allocate and copy.

    Example:
        >>> copy_padded(np.ones((1, 2), np.float32), np.empty((2, 3), np.float32)).tolist()
        [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """
    if out.ndim != array.ndim or any(n < m for n, m in zip(out.shape, array.shape)):
        raise ValueError(f"can't pad an array of shape {list(array.shape)} to {list(out.shape)}")
    out[tuple(slice(n) for n in array.shape)] = array
    for axis, n in enumerate(array.shape):
        out[(slice(None),) * axis + (slice(n, None),)] = 0
    return out


def digest(arrays: Mapping[str, np.ndarray]) -> str:
    """The content hash of named arrays (names, dtypes, shapes and bytes): equal arrays have equal digests,
    whoever computes them (a client's LoRA weights are kept by servers under it).

    Example:
        >>> a = {"q_proj_lora_a": np.zeros((4, 2), np.float32), "q_proj_lora_b": np.ones((2, 4), np.float32)}
        >>> digest(a) == digest(dict(reversed(a.items()))), len(digest(a))
        (True, 32)
    """
    hashed = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        hashed.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        hashed.update(array.data.cast("B"))
    return hashed.hexdigest()
