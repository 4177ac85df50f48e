"""Build one small AnnData and write it in every layout the readers support.

Each :class:`Source` is a path, the ``open_reader`` keyword arguments and the obs columns it stores;
all of them hold the same counts and cell metadata, so every reader must yield the same chunks.
Reusable by other test folders (e.g. cross-source tokenizer tests).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

N_CELLS, N_GENES = 57, 23
#: obs columns every AnnData source stores; loom and the legacy layout store the plain ones only.
ANNDATA_OBS = ["n_counts", "filter_pass", "cell_type", "donor", "is_doublet", "n_genes_opt", "qc_ok"]
PLAIN_OBS = ["n_counts", "filter_pass", "donor"]


@dataclass
class Source:
    """A written copy of the reference AnnData and how to open it."""

    name: str
    path: Path
    kwargs: dict = field(default_factory=dict)
    obs_columns: list[str] = field(default_factory=lambda: list(ANNDATA_OBS))


def make_adata() -> ad.AnnData:
    """57 cells x 23 genes of integer counts with empty cells and genes and varied obs columns."""
    rng = np.random.default_rng(42)
    counts = rng.poisson(0.6, size=(N_CELLS, N_GENES)).astype(np.float32)
    counts[rng.random((N_CELLS, N_GENES)) < 0.3] = 0
    counts[[0, 13, 56]] = 0  # empty cells, including the first and the last
    counts[:, [4, 22]] = 0  # genes never expressed
    counts[5, :] = rng.integers(1, 500, N_GENES)  # a dense cell with large counts
    cell_type = pd.Categorical(rng.choice(["T", "B", "NK"], N_CELLS))
    cell_type[[3, 30]] = np.nan
    obs = pd.DataFrame(
        {
            "n_counts": counts.sum(1).astype(np.float64) + 3.0,
            "filter_pass": (rng.random(N_CELLS) < 0.8).astype(np.int64),
            "cell_type": cell_type,
            "donor": [f"donor-{i}-é" for i in range(N_CELLS)],  # unique: stays a string column
            "is_doublet": rng.random(N_CELLS) < 0.1,
            "n_genes_opt": pd.array([None if i % 7 == 0 else i for i in range(N_CELLS)], dtype="Int64"),
            "qc_ok": pd.array(
                [None if i % 11 == 0 else bool(i % 2) for i in range(N_CELLS)], dtype="boolean"
            ),
        },
        index=[f"cell-{i:03d}" for i in range(N_CELLS)],
    )
    var = pd.DataFrame(
        {"gene_ids": [f"ENSG{i:011d}" for i in range(N_GENES)]}, index=[f"GENE{i}" for i in range(N_GENES)]
    )
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var)


def _write_loom(adata: ad.AnnData, path: Path) -> None:
    import loompy

    dense = adata.X.toarray()
    loompy.create(
        str(path),
        {"": dense.T, "counts": dense.T},
        {"Gene": adata.var_names.to_numpy(), "Accession": adata.var["gene_ids"].to_numpy()},
        {
            "CellID": adata.obs_names.to_numpy(),
            "n_counts": adata.obs["n_counts"].to_numpy(),
            "filter_pass": adata.obs["filter_pass"].to_numpy(),
            "donor": adata.obs["donor"].to_numpy(),
        },
    )


def _write_legacy_zarr(adata: ad.AnnData, path: Path) -> None:
    """Early anndata-zarr layout (like scanpy's 10x-10k-subset.zarr): dense X, structured obs/var."""
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    x = root.create_array("X", shape=adata.shape, chunks=(10, N_GENES), dtype="<f4")
    x[...] = adata.X.toarray()
    obs = np.zeros(
        adata.n_obs, dtype=[("index", "S12"), ("n_counts", "<f8"), ("filter_pass", "<i8"), ("donor", "S16")]
    )
    obs["index"] = adata.obs_names.to_numpy().astype("S12")
    obs["n_counts"] = adata.obs["n_counts"]
    obs["filter_pass"] = adata.obs["filter_pass"]
    obs["donor"] = [s.encode() for s in adata.obs["donor"]]
    var = np.zeros(adata.n_vars, dtype=[("index", "S13"), ("gene_ids", "S18")])
    var["index"] = adata.var_names.to_numpy().astype("S13")
    var["gene_ids"] = adata.var["gene_ids"].to_numpy().astype("S18")
    for name, table in (("obs", obs), ("var", var)):
        arr = root.create_array(name, shape=table.shape, dtype=table.dtype, chunks=table.shape)
        arr[...] = table


def write_sources(adata: ad.AnnData, folder: Path) -> dict[str, Source]:
    """Write ``adata`` in every supported layout under ``folder``."""
    out: dict[str, Source] = {}

    def h5ad(name: str, a: ad.AnnData, kwargs: dict | None = None, **write_kw) -> None:
        path = folder / f"{name}.h5ad"
        a.write_h5ad(path, **write_kw)
        out[name] = Source(name, path, kwargs or {})

    h5ad("h5ad_csr", adata)
    csc = adata.copy()
    csc.X = sp.csc_matrix(adata.X)
    h5ad("h5ad_csc", csc)
    dense = adata.copy()
    dense.X = adata.X.toarray()
    h5ad("h5ad_dense_gzip", dense, compression="gzip")  # chunked HDF5 storage
    h5ad("h5ad_dense", dense)  # contiguous HDF5 storage
    layered = adata.copy()
    layered.layers["counts"] = adata.X.copy()
    layered.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    h5ad("h5ad_layer", layered, {"layer": "counts"})
    with_raw = adata.copy()
    with_raw.raw = adata
    with_raw = with_raw[:, 2:9].copy()
    with_raw.X = sp.csr_matrix(np.log1p(with_raw.X.toarray()))
    h5ad("h5ad_raw", with_raw, {"use_raw": True})

    previous = ad.settings.zarr_write_format
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr v3 string-dtype notices
        for fmt in (2, 3):
            ad.settings.zarr_write_format = fmt
            try:
                path = folder / f"v{fmt}.zarr"
                adata.write_zarr(path)
                out[f"zarr_v{fmt}"] = Source(f"zarr_v{fmt}", path)
                path = folder / f"v{fmt}_dense.zarr"
                dense.write_zarr(path, chunks=(10, N_GENES))
                out[f"zarr_v{fmt}_dense"] = Source(f"zarr_v{fmt}_dense", path)
            finally:
                ad.settings.zarr_write_format = previous
        legacy = folder / "legacy.zarr"
        _write_legacy_zarr(adata, legacy)
    out["zarr_legacy"] = Source("zarr_legacy", legacy, {}, list(PLAIN_OBS))
    _write_loom(adata, folder / "cells.loom")
    out["loom"] = Source("loom", folder / "cells.loom", {}, list(PLAIN_OBS))
    out["loom_layer"] = Source("loom_layer", folder / "cells.loom", {"layer": "counts"}, list(PLAIN_OBS))
    return out


def write_h5_without_x(path: Path) -> None:
    """An HDF5 file with obs and var but no X (and no layers)."""
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        for name in ("obs", "var"):
            g = f.create_group(name)
            g.attrs["encoding-type"] = "dataframe"
            g.attrs["_index"] = "_index"
            g.attrs["column-order"] = np.array([], dtype="S1")
            g.create_dataset("_index", data=np.array([b"a", b"b"]))


def write_matrix_h5ad(path: Path, m: sp.csr_matrix, **kw) -> None:
    """``m`` as an h5ad written by anndata (cells c0.., genes g0.., one numeric obs and var column);
    ``kw`` goes to ``write_h5ad`` (e.g. ``compression="gzip"``)."""
    a = ad.AnnData(m, obs={"n": np.arange(m.shape[0])}, var={"g": np.arange(m.shape[1])})
    a.obs_names = [f"c{i}" for i in range(m.shape[0])]
    a.var_names = [f"g{j}" for j in range(m.shape[1])]
    a.write_h5ad(path, **kw)


def read_matrix(path: Path, n_cols: int) -> sp.csr_matrix:
    """Every cell of the file read back through ``open_reader`` in 7-cell chunks, as one CSR matrix."""
    from scfm_fast.readers import open_reader

    with open_reader(str(path)) as r:
        blocks = list(r.iter_chunks(start=0, chunk_size=7))
    return sp.vstack([sp.csr_matrix((b.data, b.indices, b.indptr), shape=(b.n_cells, n_cols)) for b in blocks]).tocsr()
