"""jaxseq.arrays.all_finite: the finiteness check every request and reply goes through."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from jaxseq.arrays import all_finite, copy_padded

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


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_every_layout_is_checked(dtype, layout):
    x = np.random.default_rng(1).standard_normal((64, 48)).astype(dtype)
    view = {"contiguous": x, "transposed": x.T, "strided": x[::3, 1::2]}[layout]
    assert all_finite(view)
    view[5, 7] = np.nan
    assert not all_finite(view)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_values_whose_squares_overflow_are_finite(dtype):
    root_of_max = np.sqrt(ml_dtypes.finfo(dtype).max)
    x = np.full(8, 2 * root_of_max, dtype)
    assert all_finite(x)
    x[3] = np.inf
    assert not all_finite(x)


@pytest.mark.parametrize(
    "shape, padded", [((2, 3), (2, 3)), ((2, 3), (5, 3)), ((2, 3), (2, 8)), ((1, 2, 3), (4, 5, 6)), ((0, 4), (2, 4))]
)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
def test_copy_padded_equals_np_pad(shape, padded, dtype):
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    out = np.full(padded, np.nan, dtype)  # whatever the memory held before must not show
    got = copy_padded(x, out)
    assert got is out
    want = np.pad(x.astype(dtype), [(0, p - s) for s, p in zip(shape, padded)])
    np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))


@pytest.mark.parametrize("padded", [(1, 3), (2, 3, 1), (3,)])
def test_copy_padded_refuses_a_smaller_or_other_rank_target(padded):
    with pytest.raises(ValueError, match=r"can't pad an array of shape \[2, 3\]"):
        copy_padded(np.zeros((2, 3), np.float32), np.zeros(padded, np.float32))
