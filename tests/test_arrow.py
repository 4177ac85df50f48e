"""Arrow arrays from numpy buffers (:mod:`scfm_fast._arrow`) equal ``pyarrow.array``'s, and building them
never imports pandas (pyarrow's own conversion does, in every tokenize worker)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from scfm_fast import _arrow


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint16, np.float32, np.float64, bool])
@pytest.mark.parametrize("n", [0, 1, 13, 64])
def test_numbers_and_booleans_equal_pyarrows(dtype, n):
    rng = np.random.default_rng(n)
    values = (rng.integers(0, 2, n) if dtype is bool else rng.integers(-50, 50, n)).astype(dtype)
    mask = rng.random(n) < 0.3
    for v, m in ((values, None), (values, mask), (values[::2], mask[::2])):  # strided input too
        got = _arrow.array(v, mask=m)
        got.validate(full=True)
        assert got.equals(pa.array(v, mask=m)), (dtype, n)


def test_a_dtype_converts_first():
    got = _arrow.array(np.array([1, 2, 3], dtype=np.int64), dtype=np.int32)
    assert got.type == pa.int32() and got.to_pylist() == [1, 2, 3]
    with pytest.raises(TypeError, match="1-D numeric"):
        _arrow.array(np.array(["a"]))
    with pytest.raises(TypeError, match="1-D numeric"):
        _arrow.array(np.zeros((2, 2)))


def test_strings_and_lists():
    values = ["a", None, "ü𝄞", "", "cell-7"]
    got = _arrow.strings(values)
    got.validate(full=True)
    assert got.equals(pa.array(values, type=pa.string()))
    assert _arrow.strings([]).equals(pa.array([], type=pa.string()))
    lists = _arrow.list_array(np.array([0, 2, 2, 5], dtype=np.int64), _arrow.array(np.arange(5, dtype=np.int32)))
    lists.validate(full=True)
    assert lists.to_pylist() == [[0, 1], [], [2, 3, 4]]


def test_building_arrays_does_not_import_pandas():
    code = ("import sys, numpy as np; from scfm_fast import _arrow; "
            "_arrow.list_array(np.array([0, 1]), _arrow.array(np.array([1.0]), mask=np.array([True]))); "
            "_arrow.strings(['a', None]); print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
