"""Readers never pull more than a bounded number of elements from storage in one read.

Every storage read goes through ``_nodes.read_slice``, which records its size in ``reader.stats``;
the bound is checked on element counts, so the test is deterministic (no timing, no RSS).
"""

from __future__ import annotations

import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfm_fast.readers.h5ad import H5adReader
from scfm_fast.readers.loom import LoomReader
from scfm_fast.readers.zarr import ZarrReader

from .test_equivalence import chunk_to_dense

N_CELLS, N_GENES = 3_000, 40
BUDGET, BLOCK_ROWS, STORE_ROWS = 600, 200, 10  # STORE_ROWS * N_GENES <= BUDGET


def _write_loom(x: np.ndarray, path) -> None:
    """Minimal hand-written loom: genes x cells matrix chunked by STORE_ROWS cells."""
    with h5py.File(path, "w") as f:
        f.create_dataset("matrix", data=x.T, chunks=(N_GENES, STORE_ROWS), compression="gzip")
        f.create_group("layers")
        f.create_group("row_attrs").create_dataset(
            "Gene", data=np.array([f"G{i}" for i in range(N_GENES)], dtype="S8")
        )
        cols = f.create_group("col_attrs")
        cols.create_dataset("CellID", data=np.array([f"c{i}" for i in range(N_CELLS)], dtype="S8"))
        cols.create_dataset("n_counts", data=x.sum(1))


@pytest.fixture(scope="module")
def big_sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bounded")
    rng = np.random.default_rng(7)
    x = rng.poisson(0.3, size=(N_CELLS, N_GENES)).astype(np.float32)
    obs = pd.DataFrame(
        {"n_counts": x.sum(1), "kind": pd.Categorical(rng.choice(["a", "b"], N_CELLS))},
        index=[f"c{i}" for i in range(N_CELLS)],
    )
    adata = ad.AnnData(sp.csr_matrix(x), obs=obs)
    out = {}
    adata.write_h5ad(folder / "csr.h5ad")
    out["h5ad_csr"] = (H5adReader, folder / "csr.h5ad")
    csc = adata.copy()
    csc.X = sp.csc_matrix(x)
    csc.write_h5ad(folder / "csc.h5ad")
    out["h5ad_csc"] = (H5adReader, folder / "csc.h5ad")
    dense = adata.copy()
    dense.X = x
    dense.write_h5ad(folder / "dense.h5ad", compression="gzip", compression_opts=1)
    with h5py.File(folder / "dense.h5ad", "a") as f:  # re-store X with small, known chunks
        del f["X"]
        f.create_dataset("X", data=x, chunks=(STORE_ROWS, N_GENES))
    out["h5ad_dense"] = (H5adReader, folder / "dense.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notice about the default zarr format
        adata.write_zarr(folder / "csr.zarr")
        dense.write_zarr(folder / "dense.zarr", chunks=(STORE_ROWS, N_GENES))
    out["zarr_csr"] = (ZarrReader, folder / "csr.zarr")
    out["zarr_dense"] = (ZarrReader, folder / "dense.zarr")
    _write_loom(x, folder / "cells.loom")
    out["loom"] = (LoomReader, folder / "cells.loom")
    return x, out


@pytest.mark.parametrize("name", ["h5ad_csr", "h5ad_csc", "h5ad_dense", "zarr_csr", "zarr_dense", "loom"])
@pytest.mark.parametrize("chunk_size", [10, 100])
def test_reads_are_bounded(big_sources, name, chunk_size):
    x, table = big_sources
    cls, path = table[name]
    columns = ["n_counts"] if name == "loom" else ["n_counts", "kind"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CSC.*")
        reader = cls(path, max_block_elements=BUDGET, max_block_rows=BLOCK_ROWS)
    with reader:
        # Opening reads only the gene axis (var names; CSC's per-gene pointers).
        assert reader.stats.max_elements <= N_GENES + 1
        n_cells = largest_chunk = 0
        for chunk in reader.iter_chunks(chunk_size=chunk_size, obs_columns=columns):
            assert chunk.n_cells == chunk_size
            np.testing.assert_array_equal(chunk_to_dense(chunk, N_GENES), x[chunk.start : chunk.stop])
            n_cells += chunk.n_cells
            largest_chunk = max(largest_chunk, chunk.data.size)
        stats = reader.stats
    assert n_cells == N_CELLS
    # No single read exceeds the element budget or one output chunk (+1 for an indptr window's
    # closing entry): a bound independent of the number of cells, and far below the matrix size.
    assert stats.max_elements <= max(BUDGET, largest_chunk) + 1
    assert stats.max_elements * 50 < x.size
    if name != "h5ad_csc":  # CSR and dense sources read each stored element about once
        assert stats.total_elements <= 3 * x.size


def test_block_budget_independent_of_cells(big_sources):
    """Doubling the cells read does not change the largest single read."""
    _, table = big_sources
    cls, path = table["h5ad_csr"]
    peaks = []
    for stop_chunks in (5, 30):
        with cls(path, max_block_elements=BUDGET, max_block_rows=BLOCK_ROWS) as reader:
            for i, _ in enumerate(reader.iter_chunks(chunk_size=100)):
                if i + 1 == stop_chunks:
                    break
            peaks.append(reader.stats.max_elements)
    assert peaks[0] == peaks[1]
