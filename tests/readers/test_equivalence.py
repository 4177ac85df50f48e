"""Every source layout yields exactly the counts and cell metadata of the in-memory AnnData."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from scfm_fast.readers import CellChunk, Reader, open_reader

SOURCE_NAMES = [
    "h5ad_csr",
    "h5ad_csc",
    "h5ad_dense_gzip",
    "h5ad_dense",
    "h5ad_layer",
    "h5ad_raw",
    "zarr_v2",
    "zarr_v3",
    "zarr_v2_dense",
    "zarr_v3_dense",
    "zarr_legacy",
    "loom",
    "loom_layer",
]


def _open(src):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*stored as CSC.*")
        return open_reader(src.path, **src.kwargs)


def chunk_to_dense(chunk: CellChunk, n_vars: int) -> np.ndarray:
    """Dense rows of a chunk; duplicate entries would add up, as in scipy."""
    out = np.zeros((chunk.n_cells, n_vars), dtype=np.float64)
    rows = np.repeat(np.arange(chunk.n_cells), np.diff(chunk.indptr))
    np.add.at(out, (rows, chunk.indices), chunk.data)
    return out


def _values(col) -> list:
    """Column values as plain Python objects with every kind of missing value as None."""
    s = pd.Series(col).astype(object)
    return [None if pd.isna(v) else (v.item() if isinstance(v, np.generic) else v) for v in s]


@pytest.mark.parametrize("name", SOURCE_NAMES)
@pytest.mark.parametrize("chunk_size", [1, 7, 57, 1000])
@pytest.mark.parametrize("start", [0, 5])
def test_source_matches_anndata(sources, ref_adata, name, chunk_size, start):
    src = sources[name]
    expected = ref_adata.X.toarray()
    with _open(src) as reader:
        assert isinstance(reader, Reader)
        assert (reader.n_obs, reader.n_vars) == ref_adata.shape
        chunks = list(reader.iter_chunks(start=start, chunk_size=chunk_size, obs_columns=src.obs_columns))
    sizes = [c.n_cells for c in chunks]
    n_left = ref_adata.n_obs - start
    assert sum(sizes) == n_left
    assert all(s == chunk_size for s in sizes[:-1]) and 0 < sizes[-1] <= chunk_size
    row = start
    for chunk in chunks:
        assert chunk.start == row
        assert chunk.indptr.dtype == np.int64 and chunk.indptr[0] == 0
        assert chunk.indices.dtype == np.int32
        assert chunk.data.dtype in (np.float32, np.float64)
        assert chunk.indptr[-1] == chunk.indices.size == chunk.data.size
        np.testing.assert_array_equal(chunk_to_dense(chunk, reader.n_vars), expected[row : chunk.stop])
        exp_obs = ref_adata.obs.iloc[row : chunk.stop]
        assert list(chunk.obs.columns) == src.obs_columns
        assert list(chunk.obs.index) == list(exp_obs.index)
        for col in src.obs_columns:
            assert _values(chunk.obs[col]) == _values(exp_obs[col]), col
        row = chunk.stop


@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_var_names_and_metadata(sources, ref_adata, name):
    src = sources[name]
    with _open(src) as reader:
        names = list(reader.var_names)
        assert reader.obs_names_available
        assert set(src.obs_columns) <= set(reader.obs_columns)
    if name.startswith("loom"):  # default loom gene ids: Accession
        assert names == list(ref_adata.var["gene_ids"])
    else:
        assert names == list(ref_adata.var_names)


@pytest.mark.parametrize("name", ["h5ad_csr", "h5ad_dense", "zarr_v2", "zarr_v3", "zarr_legacy", "loom"])
def test_gene_id_column(sources, ref_adata, name):
    column = "Gene" if name == "loom" else "gene_ids"
    expected = ref_adata.var_names if name == "loom" else ref_adata.var["gene_ids"]
    with open_reader(sources[name].path, gene_id_column=column) as reader:
        gene_ids = reader.var_names
    assert list(gene_ids) == list(expected)
    assert gene_ids.dtype.kind == "U"


def test_start_at_end_and_empty_obs_request(sources):
    with _open(sources["h5ad_csr"]) as reader:
        assert list(reader.iter_chunks(start=reader.n_obs)) == []
        chunk = next(reader.iter_chunks(chunk_size=4))
        assert chunk.obs.shape == (4, 0)
        assert list(chunk.obs.index) == [f"cell-{i:03d}" for i in range(4)]


def test_invalid_iteration_arguments(sources):
    with _open(sources["h5ad_csr"]) as reader:
        with pytest.raises(ValueError, match="chunk_size"):
            reader.iter_chunks(chunk_size=0)
        with pytest.raises(ValueError, match="start"):
            reader.iter_chunks(start=reader.n_obs + 1)


def test_csc_warns_once_per_file(tmp_path, ref_adata):
    adata = ref_adata.copy()
    adata.X = adata.X.tocsc()
    path = tmp_path / "csc.h5ad"
    adata.write_h5ad(path)
    with pytest.warns(UserWarning, match="CSC") as record:
        open_reader(path).close()
    assert str(path) in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_reader(path).close()


def test_var_columns(sources, ref_adata):
    with _open(sources["zarr_v3"]) as reader:
        assert "gene_ids" in reader.var_columns
        assert list(reader.read_var_column("gene_ids")) == list(ref_adata.var["gene_ids"])
