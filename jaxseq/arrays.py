"""Checks on the numpy arrays that cross the wire, shared by clients and servers."""

from __future__ import annotations

import numpy as np


def all_finite(array: np.ndarray) -> bool:
    """Whether every value of a floating ``array`` is finite.

    A sum reads the array once and is NaN or inf if any value is; only a sum that overflows needs the
    exact check, which reads the array and writes a mask as large as a quarter of it (float32) first.
    Floats narrower than 32 bits are summed in float32 (float16 and bfloat16 sums in their own width
    would overflow, or be slow to compute).

    Example:
        >>> all_finite(np.array([1.0, np.inf])), all_finite(np.full(4, 3e38, np.float32))
        (False, True)
    """
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(array, axis=None, dtype=np.float32 if array.dtype.itemsize < 4 else None)
    return bool(np.isfinite(total)) or bool(np.isfinite(array).all())
