"""Damaged inputs are errors naming the file, never zeros: missing Zarr chunks, bad indptr, broken HDF5."""

from __future__ import annotations

import os
import shutil

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from scfm_fast._errors import InputFileError
from scfm_fast.readers import open_reader


def _adata(n_cells: int = 60, n_genes: int = 30) -> ad.AnnData:
    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, (n_cells, n_genes)).astype(np.float32)
    X[rng.random(X.shape) > 0.4] = 0
    X[:, 0] = 1  # no empty cell: every chunk of every array holds non-zero values
    return ad.AnnData(sp.csr_matrix(X))


def _read_all(path) -> int:
    with open_reader(path) as r:
        return sum(c.n_cells for c in r.iter_chunks(chunk_size=16))


def _write_zarr(path, fmt: int) -> None:
    a = _adata()
    with ad.settings.override(zarr_write_format=fmt):
        a.write_zarr(path)
    # small chunks, so that the arrays have several chunks each
    g = zarr.open_group(path, mode="a")["X"]
    for key in ("data", "indices", "indptr"):
        values = np.asarray(g[key][...])
        del g[key]
        g.create_array(key, data=values, chunks=(16,))
    zarr.consolidate_metadata(path)  # anndata consolidates; keep that metadata current


@pytest.mark.parametrize("fmt", [2, 3])
@pytest.mark.parametrize("array", ["data", "indices", "indptr"])
def test_missing_zarr_chunk_is_an_error(tmp_path, fmt, array):
    path = tmp_path / "m.zarr"
    _write_zarr(path, fmt)
    assert _read_all(path) == 60  # intact
    chunk = "1" if fmt == 2 else os.path.join("c", "1")
    os.remove(path / "X" / array / chunk)  # an interrupted copy
    with pytest.raises(InputFileError, match=rf"m\.zarr: chunk .* of X/{array} is missing.*re-copy the file"):
        _read_all(path)


@pytest.mark.parametrize("damage,match", [
    (lambda ip: ip.__setitem__(37, ip[36] - 1), r"the matrix's indptr decreases at row 36 .*re-export"),
    (lambda ip: ip.__setitem__(-1, ip[-1] + 50), r"rows .*indptr points to .* entries but .*re-export"),
], ids=["decreasing", "past-the-end"])
def test_bad_indptr_names_file_and_row(tmp_path, damage, match):
    path = tmp_path / "bad.h5ad"
    _adata().write_h5ad(path)
    with h5py.File(path, "r+") as f:
        ip = f["X/indptr"][...]
        damage(ip)
        f["X/indptr"][...] = ip
    with pytest.raises(InputFileError, match=r"bad\.h5ad: " + match):
        _read_all(path)


def test_corrupt_hdf5_chunk_names_file_and_rows(tmp_path):
    path = tmp_path / "corrupt.h5ad"
    a = _adata(n_cells=400)
    a.write_h5ad(path, compression="gzip")
    with h5py.File(path, "r") as f:
        info = f["X/data"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:  # scramble the first compressed chunk of X/data
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * min(info.size, 64))
    with pytest.raises(InputFileError, match=r"corrupt\.h5ad: cannot read the cells from row 0 on .*re-export"):
        _read_all(path)


def test_damaged_h5ad_structure_names_the_file(tmp_path):
    path = tmp_path / "broken.h5ad"
    _adata().write_h5ad(path)
    with h5py.File(path, "r+") as f:
        idx = f["var"].attrs["_index"]
        f["var"][idx].attrs["encoding-type"] = "no-such-encoding"
        del f["var"][idx]
        f["var"].create_dataset(idx, data=np.zeros((3, 3)))  # a 2-D index of the wrong length
    with pytest.raises(InputFileError, match=r"broken\.h5ad: "):
        open_reader(path)


def test_zarr_reader_survives_a_copy_with_every_chunk(tmp_path):
    path = tmp_path / "m.zarr"
    _write_zarr(path, 3)
    shutil.copytree(path, tmp_path / "copy.zarr")
    assert _read_all(tmp_path / "copy.zarr") == 60
