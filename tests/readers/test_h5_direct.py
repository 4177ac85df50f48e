"""Contiguous uncompressed HDF5 arrays read as views of the file equal h5py's reads; other layouts use h5py;
a truncated file is an error naming it, not a crash."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.sparse as sp

import scfm_fast.readers._h5_direct as direct
from scfm_fast._errors import InputFileError
from scfm_fast.readers import open_reader

from ._build import read_matrix, write_matrix_h5ad

h5py = pytest.importorskip("h5py")
ad = pytest.importorskip("anndata")


def _matrix(dtype=np.float32):
    rng = np.random.default_rng(1)
    m = sp.random(80, 50, density=0.25, format="csr", random_state=rng, dtype=np.float64)
    m.data = np.ceil(m.data * 20).astype(dtype)
    return m


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_mapped_slices_equal_h5py(tmp_path, dtype):
    m = _matrix(dtype)
    write_matrix_h5ad(tmp_path / "a.h5ad", m)
    with h5py.File(tmp_path / "a.h5ad", "r") as f:
        for name in ("X/data", "X/indices", "X/indptr"):
            ds = f[name]
            n = ds.shape[0]
            for sel in (slice(0, n), slice(3, 17), slice(n - 5, n), slice(4, 4), slice(n + 3, n + 9)):
                got = direct.read_mapped(ds, sel)
                assert got is not None and not isinstance(got, np.memmap) and (got.size == 0 or not got.flags.writeable)
                np.testing.assert_array_equal(got, ds[sel])
                assert got.dtype == ds.dtype
    assert (read_matrix(tmp_path / "a.h5ad", m.shape[1]) != m).nnz == 0


def test_contiguous_storage_and_chunks_end_to_end_are_mapped(tmp_path):
    """anndata writes chunked arrays; h5py's default (as the benchmark writes) is contiguous storage."""
    vals = np.arange(1000, dtype=np.float32) * 3
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("contig", data=vals)
        f.create_dataset("chunked", data=vals, chunks=(64,))
        f.create_dataset("unwritten", shape=(100,), dtype=np.float32, chunks=(10,))
        part = f.create_dataset("partial", shape=(100,), dtype=np.float32, chunks=(10,))
        part[:30] = 1
    with h5py.File(tmp_path / "c.h5", "r") as f:
        for name in ("contig", "chunked"):
            np.testing.assert_array_equal(direct.read_mapped(f[name], slice(100, 990)), vals[100:990])
        assert direct.read_mapped(f["unwritten"], slice(0, 5)) is None  # fill values: not in the file
        assert direct.read_mapped(f["partial"], slice(0, 5)) is None


def test_chunks_out_of_order_in_the_file_read_through_h5py(tmp_path):
    """Chunks written in reverse order lie in the file back to front: not one contiguous range."""
    with h5py.File(tmp_path / "r.h5", "w") as f:
        ds = f.create_dataset("x", shape=(40,), dtype=np.int32, chunks=(10,))
        for lo in (30, 20, 10, 0):
            ds[lo:lo + 10] = np.arange(lo, lo + 10)
    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert direct.read_mapped(f["x"], slice(0, 40)) is None
        np.testing.assert_array_equal(f["x"][:], np.arange(40))


def test_chunked_or_compressed_datasets_read_through_h5py(tmp_path):
    m = _matrix()
    write_matrix_h5ad(tmp_path / "gz.h5ad", m, compression="gzip")
    with h5py.File(tmp_path / "gz.h5ad", "r") as f:
        assert direct.read_mapped(f["X/data"], slice(0, 10)) is None
        assert direct.read_mapped(f["X/data"], slice(0, 10, 2)) is None  # strided: h5py
    assert (read_matrix(tmp_path / "gz.h5ad", m.shape[1]) != m).nnz == 0


def test_truncated_file_is_an_error_naming_it(tmp_path):
    m = _matrix()
    p = tmp_path / "cut.h5ad"
    write_matrix_h5ad(p, m)
    with h5py.File(p, "r") as f:
        ds = f["X/data"]
        end = direct._start(ds) + ds.nbytes
        # the length check itself (HDF5 usually refuses a truncated file at open already)
        with pytest.raises(InputFileError, match=r"cut\.h5ad: dataset '/X/data' runs past the end.*truncated"):
            direct._check(ds, str(p), end - 4)
        assert direct._check(ds, str(p), end) == direct._start(ds)
    with open(p, "r+b") as fh:
        fh.truncate(end - 8)
    direct._PLANS.clear()
    with pytest.raises(InputFileError, match="cut.h5ad"):
        with open_reader(str(p)) as r:
            for _ in r.iter_chunks(start=0, chunk_size=7):
                pass


def test_map_is_released_with_its_last_view(tmp_path):
    """Resident memory stays bounded: each block's map closes when its arrays are gone."""
    import gc
    import weakref

    m = _matrix()
    write_matrix_h5ad(tmp_path / "a.h5ad", m)
    with h5py.File(tmp_path / "a.h5ad", "r") as f:
        arr = direct.read_mapped(f["X/data"], slice(0, 20))
        piece = arr[5:10]
        base = arr.base
        ref = weakref.ref(base)
        del arr, base
        gc.collect()
        assert ref() is not None  # the piece still views it
        del piece
        gc.collect()
        assert ref() is None


def test_probe_mismatch_falls_back_to_h5py(tmp_path, monkeypatch):
    m = _matrix()
    write_matrix_h5ad(tmp_path / "a.h5ad", m)
    direct._PLANS.clear()
    monkeypatch.setattr(direct, "_map", lambda fname, off, dtype, lo, hi: np.full(hi - lo, -1, dtype=dtype))
    with h5py.File(tmp_path / "a.h5ad", "r") as f:
        assert direct.read_mapped(f["X/data"], slice(0, 10)) is None
    direct._PLANS.clear()


def test_file_rewritten_in_place_is_mapped_afresh(tmp_path):
    p = tmp_path / "a.h5ad"
    m = _matrix()
    write_matrix_h5ad(p, m)
    assert (read_matrix(p, m.shape[1]) != m).nnz == 0
    m2 = _matrix()[:40]
    m2.data = m2.data + 1
    os.remove(p)
    write_matrix_h5ad(p, m2)
    assert (read_matrix(p, m2.shape[1]) != m2).nnz == 0
