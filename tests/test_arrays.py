"""jaxseq.arrays.all_finite: the finiteness check every request and reply goes through."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from jaxseq.arrays import all_finite

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 777, -1])
def test_one_non_finite_value_anywhere_is_found(dtype, bad, where):
    x = np.random.default_rng(0).standard_normal((2, 33, 17)).astype(dtype)
    assert all_finite(x)
    x.flat[where] = bad
    assert not all_finite(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_sums_that_overflow_or_cancel(dtype):
    largest = ml_dtypes.finfo(dtype).max
    assert all_finite(np.full(1000, largest, dtype))  # the sum overflows; every value is finite
    assert all_finite(np.array([largest, -largest], dtype))
    assert not all_finite(np.array([np.inf, -np.inf, 1.0], dtype))  # the sum is NaN
    assert all_finite(np.zeros((0, 4), dtype))


def test_reports_no_floating_point_warnings():
    with np.errstate(all="raise"):
        assert all_finite(np.full(10, 3e38, np.float32))
        assert not all_finite(np.array([np.inf, -np.inf], np.float32))
