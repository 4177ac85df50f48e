"""Less common on-disk encodings: pre-0.7 AnnData, nullable strings, integer counts, zarr shards."""

from __future__ import annotations

import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from scfm_fast._errors import InputFileError
from scfm_fast.readers import open_reader

from .test_equivalence import chunk_to_dense


def _all_rows(reader, **kw) -> tuple[np.ndarray, pd.DataFrame]:
    chunks = list(reader.iter_chunks(chunk_size=4, **kw))
    dense = np.concatenate([chunk_to_dense(c, reader.n_vars) for c in chunks])
    return dense, pd.concat([c.obs for c in chunks])


def _write_pre07_h5ad(path, x: np.ndarray) -> None:
    """anndata < 0.7 layout: structured obs/var, h5sparse CSR X, raw.X / raw.var, uns categories."""
    csr = sp.csr_matrix(x)
    n_obs, n_vars = x.shape
    with h5py.File(path, "w") as f:
        g = f.create_group("X")
        g.attrs["h5sparse_format"] = "csr"
        g.attrs["h5sparse_shape"] = np.array(x.shape)
        for key in ("data", "indices", "indptr"):
            g.create_dataset(key, data=getattr(csr, key))
        obs = np.zeros(n_obs, dtype=[("index", "S8"), ("n_counts", "<f4"), ("cell_type", "<i1")])
        obs["index"] = [f"c{i}".encode() for i in range(n_obs)]
        obs["n_counts"] = x.sum(1)
        obs["cell_type"] = np.arange(n_obs) % 2
        f.create_dataset("obs", data=obs)
        var = np.zeros(n_vars, dtype=[("index", "S8"), ("gene_ids", "S8")])
        var["index"] = [f"g{i}".encode() for i in range(n_vars)]
        var["gene_ids"] = [f"E{i}".encode() for i in range(n_vars)]
        f.create_dataset("var", data=var)
        f.create_dataset("uns/cell_type_categories", data=np.array([b"T", b"B"]))
        f.create_dataset("raw.X", data=x * 2)
        f.create_dataset("raw.var", data=var)


def test_pre07_h5ad(tmp_path):
    x = np.arange(30, dtype=np.float32).reshape(6, 5) % 4
    path = tmp_path / "old.h5ad"
    _write_pre07_h5ad(path, x)
    with open_reader(path, gene_id_column="gene_ids") as reader:
        assert list(reader.var_names) == [f"E{i}" for i in range(5)]
        assert reader.obs_columns == ["n_counts", "cell_type"]
        dense, obs = _all_rows(reader, obs_columns=["cell_type", "n_counts"])
    np.testing.assert_array_equal(dense, x)
    assert list(obs.index) == [f"c{i}" for i in range(6)]
    assert list(obs["cell_type"]) == ["T", "B"] * 3
    np.testing.assert_array_equal(obs["n_counts"], x.sum(1))
    with open_reader(path, use_raw=True) as reader:
        dense, _ = _all_rows(reader)
    np.testing.assert_array_equal(dense, x * 2)


def test_nullable_string_column(tmp_path):
    obs = pd.DataFrame(
        {"note": pd.array(["a", None, "c", "d"], dtype="string")}, index=[f"c{i}" for i in range(4)]
    )
    adata = ad.AnnData(np.eye(4, dtype=np.float32), obs=obs)
    path = tmp_path / "nullable.h5ad"
    previous = ad.settings.allow_write_nullable_strings
    ad.settings.allow_write_nullable_strings = True
    try:
        adata.write_h5ad(path)
    finally:
        ad.settings.allow_write_nullable_strings = previous
    with open_reader(path) as reader:
        _, got = _all_rows(reader, obs_columns=["note"])
    assert [None if pd.isna(v) else v for v in got["note"]] == ["a", None, "c", "d"]


@pytest.mark.parametrize(
    ("dtype", "out"), [(np.int16, np.float32), (np.int32, np.float64), (np.float64, np.float64)]
)
def test_count_dtypes_are_exact_floats(tmp_path, dtype, out):
    x = (
        np.array([[0, 70_000, 3], [1, 0, 0]]).astype(dtype)
        if dtype != np.int16
        else np.array([[0, 30_000, 3], [1, 0, 0]], dtype=dtype)
    )
    path = tmp_path / "ints.h5ad"
    ad.AnnData(x).write_h5ad(path)
    with open_reader(path) as reader:
        chunk = next(reader.iter_chunks())
    assert chunk.data.dtype == out
    np.testing.assert_array_equal(chunk_to_dense(chunk, 3), x.astype(np.float64))


def test_sharded_zarr_v3_dense(tmp_path, ref_adata):
    """Dense X stored in zarr v3 shards: blocks align to shards and the content is unchanged."""
    dense = ref_adata.copy()
    dense.X = ref_adata.X.toarray()
    path = tmp_path / "sharded.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = ad.settings.zarr_write_format
        ad.settings.zarr_write_format = 3
        try:
            dense.write_zarr(path)
        finally:
            ad.settings.zarr_write_format = previous
    root = zarr.open_group(str(path), mode="a")
    attrs = dict(root["X"].attrs)
    del root["X"]
    arr = root.create_array(
        "X", shape=dense.shape, chunks=(4, dense.n_vars), shards=(20, dense.n_vars), dtype="float32"
    )
    arr[...] = dense.X
    arr.attrs.update(attrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: consolidated metadata is not in the v3 spec yet
        zarr.consolidate_metadata(str(path))  # anndata wrote consolidated metadata; refresh it
    with open_reader(path) as reader:
        assert reader._source.block_rows % 20 == 0
        got, _ = _all_rows(reader)
    np.testing.assert_array_equal(got, dense.X)


def test_unreadable_obs_encoding(tmp_path):
    path = tmp_path / "odd.h5ad"
    ad.AnnData(np.eye(3, dtype=np.float32)).write_h5ad(path)
    with h5py.File(path, "a") as f:
        g = f["obs"].create_group("nested")
        g.attrs["encoding-type"] = "dict"
        f["obs"].attrs["column-order"] = np.array(["nested"], dtype=object)
    with open_reader(path) as reader:
        assert reader.obs_columns == ["nested"]
        with pytest.raises(InputFileError, match="cannot read per row"):
            next(reader.iter_chunks(obs_columns=["nested"]))


def test_loom_without_cell_names(tmp_path):
    path = tmp_path / "bare.loom"
    x = np.array([[0, 2, 0], [1, 0, 3]], dtype=np.int32)  # genes x cells
    with h5py.File(path, "w") as f:
        f.create_dataset("matrix", data=x)
        f.create_group("row_attrs").create_dataset("Gene", data=np.array([b"A&amp;B", b"C"]))
        f.create_group("col_attrs").create_dataset("total", data=x.sum(0))
    with open_reader(path) as reader:
        assert not reader.obs_names_available
        assert list(reader.var_names) == ["A&B", "C"]  # loom text: ASCII + XML character references
        dense, obs = _all_rows(reader, obs_columns=["total"])
    np.testing.assert_array_equal(dense, x.T)
    assert list(obs.index) == ["0", "1", "2"]
    assert list(obs["total"]) == [1, 2, 3]
