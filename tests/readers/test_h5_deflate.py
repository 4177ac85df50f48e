"""gzip HDF5 arrays inflated with libdeflate equal h5py's reads; other filters, unwritten chunks and chunks
stored with a filter skipped read through h5py; a damaged chunk is an error naming it."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import scfm_fast.readers._h5_deflate as gz
import scfm_fast.readers._nodes as nodes
from scfm_fast._errors import InputFileError
from scfm_fast.readers._kept_chunks import MAX_KEPT

from ._build import read_matrix, write_matrix_h5ad

h5py = pytest.importorskip("h5py")
ad = pytest.importorskip("anndata")
pytest.importorskip("deflate")


def _matrix(dtype=np.float32):
    rng = np.random.default_rng(2)
    m = sp.random(90, 60, density=0.25, format="csr", random_state=rng, dtype=np.float64)
    m.data = np.ceil(m.data * 30).astype(dtype)
    return m


def _dataset(path, name, values, **kw) -> None:
    with h5py.File(path, "a") as f:
        f.create_dataset(name, data=values, **kw)


def _slices(n):
    return [slice(0, n), slice(3, 17), slice(36, 37), slice(37, 111), slice(n - 5, n), slice(n - 1, n + 4)]


@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<i4", "<i8", "<u2"])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("level", [1, 9])
def test_inflated_slices_equal_h5py(tmp_path, dtype, shuffle, level):
    rng = np.random.default_rng(0)
    vals = (rng.integers(0, 5000, 1000) * rng.integers(0, 2, 1000)).astype(dtype)
    path = tmp_path / "a.h5"
    _dataset(path, "v", vals, chunks=(37,), compression="gzip", compression_opts=level, shuffle=shuffle)
    gz._PARTIAL.clear()
    with h5py.File(path, "r") as f:
        ds = f["v"]
        for sel in _slices(len(vals)):
            got = gz.read_deflated(ds, sel)
            assert got is not None and got.dtype == ds.dtype
            np.testing.assert_array_equal(got, ds[sel])
        assert gz.read_deflated(ds, slice(5, 5)) is None  # empty: h5py's (no chunk touched)


@pytest.mark.parametrize("shuffle", [False, True])
def test_gzip_h5ad_is_read_through_libdeflate(tmp_path, monkeypatch, shuffle):
    """An h5ad written with compression="gzip" (anndata's chunked X) reads through this path, block by
    block, to the same matrix."""
    m = _matrix()
    path = tmp_path / "g.h5ad"
    write_matrix_h5ad(path, m, compression="gzip")
    if shuffle:  # anndata passes no shuffle option: rewrite X/data and X/indices with one
        with h5py.File(path, "a") as f:
            for name in ("data", "indices"):
                v = f["X"][name][:]
                del f["X"][name]
                f["X"].create_dataset(name, data=v, chunks=(53,), compression="gzip", shuffle=True)
    taken = []
    real = nodes.read_deflated
    monkeypatch.setattr(nodes, "read_deflated", lambda n, s: taken.append((n.name, (r := real(n, s)) is not None))
                        or r)
    got = read_matrix(path, m.shape[1])
    assert (got != m).nnz == 0 and np.array_equal(got.indices, m.indices)
    x_reads = [t for name, t in taken if name in ("/X/data", "/X/indices")]
    assert x_reads and all(x_reads)


def test_a_chunk_split_between_reads_is_inflated_once(tmp_path, monkeypatch):
    vals = np.arange(500, dtype=np.float32)
    path = tmp_path / "a.h5"
    _dataset(path, "v", vals, chunks=(100,), compression="gzip")
    inflated = []
    real = gz._inflate
    with h5py.File(path, "r") as f:
        ds = f["v"]
        assert gz._plan(ds) is not None  # first sight: its probe inflates the first and last chunks
        gz._PARTIAL.clear()
        monkeypatch.setattr(gz, "_inflate", lambda node, k, *a: inflated.append(k) or real(node, k, *a))
        np.testing.assert_array_equal(gz.read_deflated(ds, slice(0, 150)), vals[:150])
        np.testing.assert_array_equal(gz.read_deflated(ds, slice(150, 260)), vals[150:260])
        np.testing.assert_array_equal(gz.read_deflated(ds, slice(260, 500)), vals[260:])
    assert sorted(inflated) == [0, 1, 2, 3, 4]
    # chunk 2 (kept: the last read began inside it) rewritten between reads: inflated again from its new
    # bytes, never served from the kept one (no probe here: a new plan's probe would replace the kept chunk)
    monkeypatch.setattr(gz, "_probe", lambda node, layout: True)
    with h5py.File(path, "a") as f:
        f["v"][200:300] = -vals[200:300]
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(gz.read_deflated(f["v"], slice(250, 300)), -vals[250:300])


def test_other_filters_and_layouts_read_through_h5py(tmp_path):
    vals = np.arange(300, dtype=np.float32)
    path = tmp_path / "a.h5"
    _dataset(path, "lzf", vals, chunks=(50,), compression="lzf")
    _dataset(path, "fletcher", vals, chunks=(50,), compression="gzip", fletcher32=True)
    _dataset(path, "plain", vals, chunks=(50,))
    _dataset(path, "bigendian", vals.astype(">f4"), chunks=(50,), compression="gzip")
    _dataset(path, "twod", vals.reshape(30, 10), chunks=(10, 10), compression="gzip")
    with h5py.File(path, "r") as f:
        for name in ("lzf", "fletcher", "plain", "bigendian", "twod"):
            assert gz.read_deflated(f[name], slice(0, 20)) is None, name
        assert gz.read_deflated(np.arange(5), slice(0, 2)) is None


def test_unwritten_and_unfiltered_chunks_read_through_h5py(tmp_path):
    """A chunk never written (h5py: fill values) or stored with its deflate filter skipped (filter mask):
    the read goes to h5py, whose values it gets."""
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("v", shape=(300,), dtype="<f4", chunks=(100,), compression="gzip", fillvalue=7.0)
        ds[0:100] = np.arange(100)
        ds.id.write_direct_chunk((200,), np.arange(100, dtype="<f4").tobytes(), filter_mask=1)
    with h5py.File(path, "r") as f:
        ds = f["v"]
        np.testing.assert_array_equal(gz.read_deflated(ds, slice(0, 100)), np.arange(100))
        assert gz.read_deflated(ds, slice(50, 150)) is None  # chunk 1 never written
        assert gz.read_deflated(ds, slice(250, 300)) is None  # chunk 2 stored unfiltered
        got = nodes.read_slice(ds, slice(0, 300), nodes.ReadStats())
        np.testing.assert_array_equal(got, ds[:])


def test_damaged_chunk_is_an_error_naming_it(tmp_path):
    vals = np.arange(400, dtype=np.float32)
    path = tmp_path / "a.h5"
    _dataset(path, "v", vals, chunks=(100,), compression="gzip")
    with h5py.File(path, "a") as f:
        ds = f["v"]
        _, raw = ds.id.read_direct_chunk((200,))
        ds.id.write_direct_chunk((200,), raw[:10] + bytes(b ^ 0x5A for b in raw[10:]))  # same size, bad stream
    gz._PLANS.clear()
    gz._PARTIAL.clear()
    with h5py.File(path, "r") as f:
        with pytest.raises(gz.DamagedChunk, match=r"chunk 2 of dataset '/v' cannot be inflated"):
            gz.read_deflated(f["v"], slice(0, 400))
        np.testing.assert_array_equal(gz.read_deflated(f["v"], slice(0, 200)), vals[:200])
    # a valid stream of another (shorter) chunk: not a whole chunk
    import zlib

    with h5py.File(path, "a") as f:
        f["v"].id.write_direct_chunk((100,), zlib.compress(vals[:60].tobytes()))
    with h5py.File(path, "r") as f, pytest.raises(gz.DamagedChunk, match=r"chunk 1 of dataset '/v' inflates to 240 bytes"):
        gz.read_deflated(f["v"], slice(0, 200))


def test_damaged_chunk_in_an_h5ad_names_file_rows_and_chunk(tmp_path):
    m = _matrix()
    path = tmp_path / "g.h5ad"
    write_matrix_h5ad(path, m, compression="gzip")
    with h5py.File(path, "a") as f:
        ds = f["X/indices"]
        _, raw = ds.id.read_direct_chunk((0,))
        ds.id.write_direct_chunk((0,), raw[:4] + bytes(b ^ 0x33 for b in raw[4:]))
    with pytest.raises(InputFileError, match=r"g\.h5ad: cannot read the cells from row 0 on \(DamagedChunk: chunk 0 "
                       r"of dataset '/X/indices' cannot be inflated .*re-export"):
        read_matrix(path, m.shape[1])


def test_kept_chunks_are_bounded_over_many_files(tmp_path):
    vals = np.arange(500, dtype=np.float32)
    gz._PARTIAL.clear()
    for i in range(MAX_KEPT + 5):
        path = tmp_path / f"a{i}.h5"
        _dataset(path, "v", vals, chunks=(100,), compression="gzip")
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(gz.read_deflated(f["v"], slice(0, 150)), vals[:150])
    assert len(gz._PARTIAL) == MAX_KEPT
    assert (str(tmp_path / f"a{MAX_KEPT + 4}.h5"), "/v") in gz._PARTIAL
