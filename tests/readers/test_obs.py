"""Per-cell metadata without pandas (:mod:`scfm_fast.readers.obs`): every column kind converts to what
pandas holds, to Arrow as ``pyarrow.array(..., from_pandas=True)`` would, and to numbers as
``pandas.to_numeric(errors="coerce")`` would; slicing and joining blocks equal pandas'."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from scfm_fast._errors import InputFileError
from scfm_fast.readers import open_reader
from scfm_fast.readers.base import CellChunk
from scfm_fast.readers.obs import Categorical, Masked, ObsBlock, column_to_arrow, column_to_float

ad = pytest.importorskip("anndata")


def _frame() -> pd.DataFrame:
    return pd.DataFrame({
        "i": np.array([3, -1, 7, 0], dtype=np.int32),
        "f": [1.5, np.nan, 2.0, -0.0],
        "b": [True, False, True, True],
        "text": ["a", None, "ü", ""],
        "cat": pd.Categorical(["x", None, "y", "x"], categories=["y", "x"], ordered=True),
        "nint": pd.array([1, None, 3, 4], dtype="Int16"),
        "nfloat": pd.array([0.5, None, 1.0, 2.0], dtype="Float32"),
        "nbool": pd.array([True, None, False, True], dtype="boolean"),
        "nstr": pd.array(["p", None, "q", "r"], dtype="string"),
    }, index=["c0", "c1", "c2", "c3"])


def test_a_frame_round_trips_with_its_column_kinds():
    df = _frame()
    block = ObsBlock.from_pandas(df)
    assert isinstance(block["cat"], Categorical) and block["cat"].ordered
    assert isinstance(block["nint"], Masked) and block["nint"].kind == "integer"
    assert isinstance(block["nbool"], Masked) and block["nbool"].kind == "boolean"
    assert isinstance(block["i"], np.ndarray) and block["i"].dtype == np.int32
    back = block.to_pandas()
    assert list(back.index) == list(df.index) and list(back.columns) == list(df.columns)
    for c in df.columns:
        if c == "nstr":  # pandas' string dtype comes back as Python strings (object)
            assert back[c].tolist() == [None if pd.isna(v) else v for v in df[c]]
        else:
            pd.testing.assert_series_equal(back[c], df[c], check_index_type=False)


def test_slices_and_joins_equal_pandas():
    df = _frame()
    block = ObsBlock.from_pandas(df)
    joined = ObsBlock.concat([block.slice(0, 1), block.slice(1, 1), block.slice(1, 4)])
    pd.testing.assert_frame_equal(joined.to_pandas(), block.to_pandas())
    pd.testing.assert_frame_equal(block.slice(1, 3).to_pandas(), block.to_pandas().iloc[1:3])
    assert len(ObsBlock.empty()) == 0 and ObsBlock.empty().names == []
    with pytest.raises(ValueError, match="'x' has 2 values for 3 cells"):
        ObsBlock(np.array(["a", "b", "c"], dtype=object), {"x": np.arange(2)})


def test_arrow_columns_equal_pyarrows_own_conversion():
    block = ObsBlock.from_pandas(_frame())
    for name in ("i", "f", "b", "nint", "nfloat", "nbool"):
        got = column_to_arrow(block[name])
        want = pa.array(_frame()[name], from_pandas=True)
        assert got.equals(want), name
    # text and categories: plain strings, nulls kept, typed even when every value is missing
    assert column_to_arrow(block["cat"]).to_pylist() == ["x", None, "y", "x"]
    assert column_to_arrow(block["text"]).to_pylist() == ["a", None, "ü", ""]
    assert column_to_arrow(block["nstr"]).type == pa.string()
    assert column_to_arrow(np.array([None, None], dtype=object)).type == pa.string()
    assert column_to_arrow(Categorical(np.array([-1, -1]), np.array(["a"], dtype=object))).type == pa.string()
    dates = np.array(["2026-01-01", "2026-12-02"], dtype="datetime64[D]")
    assert column_to_arrow(dates).equals(pa.array(dates))


@pytest.mark.parametrize("values", [
    np.array(["12", " 3.5", "x", None, "1e3", "nan"], dtype=object),
    np.array([1, 2, 3], dtype=np.uint8),
    np.array([True, False]),
])
def test_numbers_are_coerced_as_pandas_coerces_them(values):
    want = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64)
    np.testing.assert_array_equal(column_to_float(values), want)


def test_masked_and_categorical_numbers():
    block = ObsBlock.from_pandas(_frame())
    np.testing.assert_array_equal(column_to_float(block["nint"]), [1, np.nan, 3, 4])
    cats = Categorical(np.array([0, 1, -1]), np.array(["5", "7.5"], dtype=object))
    np.testing.assert_array_equal(column_to_float(cats), [5, 7.5, np.nan])


def test_a_chunks_obs_is_built_on_first_use_and_then_kept(tmp_path):
    df = _frame()
    chunk = CellChunk(0, np.array([0, 0, 0, 0, 0]), np.zeros(0, np.int32), np.zeros(0, np.float32),
                      ObsBlock.from_pandas(df))
    obs = chunk.obs
    assert chunk.obs is obs  # the DataFrame is the metadata from now on: an edit is seen by the tokenizer
    obs["i"] = [9, 9, 9, 9]
    assert chunk.meta["i"].tolist() == [9, 9, 9, 9]
    assert len(CellChunk(0, np.array([0]), np.zeros(0, np.int32), np.zeros(0, np.float32)).meta) == 0


def test_reader_columns_equal_anndatas(tmp_path):
    """Categorical, nullable and text obs columns as a reader hands them out equal anndata's reading."""
    df = _frame().drop(columns=["text", "nfloat"])  # anndata writes neither str+None objects nor Float32
    a = ad.AnnData(np.ones((4, 3), dtype=np.float32), obs=df)
    a.write_h5ad(tmp_path / "a.h5ad")
    with open_reader(tmp_path / "a.h5ad") as r:
        (chunk,) = list(r.iter_chunks(obs_columns=list(df.columns)))
        assert r.read_var_values  # the pandas-free gene columns exist beside read_var_column
    want = ad.read_h5ad(tmp_path / "a.h5ad").obs
    got = chunk.obs
    for c in df.columns:
        assert [None if pd.isna(v) else v for v in got[c]] == [None if pd.isna(v) else v for v in want[c]], c
        assert str(got[c].dtype) == str(want[c].dtype), c


def test_categorical_codes_outside_the_categories_name_the_file_and_column(tmp_path):
    a = ad.AnnData(np.ones((3, 2), dtype=np.float32),
                   obs=pd.DataFrame({"cell_type": pd.Categorical(["t", "b", "t"])}, index=["a", "b", "c"]))
    a.write_h5ad(tmp_path / "a.h5ad")
    with h5py.File(tmp_path / "a.h5ad", "r+") as f:
        f["obs/cell_type/codes"][1] = 7  # two categories: 7 points nowhere
    with open_reader(tmp_path / "a.h5ad") as r, pytest.raises(InputFileError) as e:
        list(r.iter_chunks(obs_columns=["cell_type"]))
    assert "a.h5ad" in str(e.value) and "'cell_type'" in str(e.value) and "damaged" in str(e.value)
