"""Readers against real files from ../shared/data, compared with anndata / zarr reading them whole."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from scfm_fast.readers import open_reader

from .test_equivalence import chunk_to_dense

LEGACY_ZARR = "mouse/scanpy_10x-10k-subset.zarr"
PBMC = "human/scvi_pbmc_5k_protein_v3_200cells.h5ad"
PANCREAS = "mouse/scvelo_pancreas_100obs.h5ad"


def _data_file(shared_dir: Path, rel: str) -> Path:
    path = shared_dir / "data" / rel
    if not path.exists():
        pytest.skip(f"real-data fixture {path} not found")
    return path


def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def test_legacy_zarr_chunk_matches_zarr(shared_dir):
    path = _data_file(shared_dir, LEGACY_ZARR)
    group = zarr.open_group(str(path), mode="r")
    with open_reader(path, gene_id_column="gene_ids") as reader:
        assert (reader.n_obs, reader.n_vars) == (10_000, 1_000)
        assert all(g.startswith("ENSMUSG") for g in reader.var_names)
        assert reader.var_names[0] == group["var"][:1]["gene_ids"][0].decode()
        # 1,500..3,100 crosses the store's 2,000-row chunk boundary.
        chunks = reader.iter_chunks(start=1_500, chunk_size=1_600)
        chunk = next(chunks)
    np.testing.assert_array_equal(chunk_to_dense(chunk, 1_000), group["X"][1_500:3_100])
    names = [v.decode() for v in group["obs"][1_500:3_100]["index"]]
    assert list(chunk.obs.index) == names
    assert chunk.data.dtype == np.float32


def test_legacy_zarr_default_gene_ids_are_var_index(shared_dir):
    path = _data_file(shared_dir, LEGACY_ZARR)
    with open_reader(path) as reader:
        assert reader.var_names[0] == "Xkr4"
        assert reader.obs_columns == []


@pytest.mark.parametrize("rel", [PBMC, PANCREAS])
def test_h5ad_matches_anndata(shared_dir, rel):
    path = _data_file(shared_dir, rel)
    adata = ad.read_h5ad(path)
    expected = _dense(adata.X)
    with open_reader(path) as reader:
        assert list(reader.var_names) == list(adata.var_names)
        assert reader.obs_columns == list(adata.obs.columns)
        chunks = list(reader.iter_chunks(chunk_size=64, obs_columns=reader.obs_columns))
    got = np.concatenate([chunk_to_dense(c, adata.n_vars) for c in chunks])
    np.testing.assert_array_equal(got, expected)
    obs = np.concatenate([c.obs.index.to_numpy() for c in chunks])
    assert list(obs) == list(adata.obs_names)
    for col in adata.obs.columns:
        values = np.concatenate([c.obs[col].to_numpy() for c in chunks])
        np.testing.assert_array_equal(values, adata.obs[col].to_numpy())


def test_h5ad_layer_matches_anndata(shared_dir):
    path = _data_file(shared_dir, PANCREAS)
    adata = ad.read_h5ad(path)
    with open_reader(path, layer="unspliced") as reader:
        chunk = next(reader.iter_chunks(start=10, chunk_size=50))
    np.testing.assert_array_equal(
        chunk_to_dense(chunk, adata.n_vars), _dense(adata.layers["unspliced"][10:60])
    )


def test_anndata_07_categorical_var_column(shared_dir):
    """The PBMC file stores var['encode'] the anndata-0.7 way (codes + reference to categories)."""
    path = _data_file(shared_dir, PBMC)
    adata = ad.read_h5ad(path)
    with open_reader(path) as reader:
        values = reader.read_var_column("encode")
    assert list(values.astype(object)) == list(adata.var["encode"].astype(object))
