"""Zarr chunks decoded directly (numcodecs) equal zarr-python's reads; a missing chunk is an error."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.sparse as sp

import scfm_fast.readers._nodes as nodes
from scfm_fast._errors import InputFileError
from scfm_fast.readers._kept_chunks import MAX_KEPT

from ._build import read_matrix

zarr = pytest.importorskip("zarr")
ad = pytest.importorskip("anndata")


def _compressor(fmt: int, name: str):
    import numcodecs

    if name == "none":
        return None
    if fmt == 2:
        return {"blosc": numcodecs.Blosc(cname="lz4", shuffle=1), "zstd": numcodecs.Zstd(level=3),
                "gzip": numcodecs.GZip(level=1)}[name]
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    return {"blosc": BloscCodec(cname="lz4"), "zstd": ZstdCodec(level=3), "gzip": GzipCodec(level=1)}[name]


def _store(path, fmt: int, comp: str, m: sp.csr_matrix) -> None:
    """An AnnData-Zarr store whose CSR arrays span several (small) chunks."""
    import pandas as pd
    from anndata.io import write_elem

    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    write_elem(root, "var", pd.DataFrame(index=[f"g{j}" for j in range(m.shape[1])]))
    write_elem(root, "obs", pd.DataFrame(index=[f"c{i}" for i in range(m.shape[0])]))
    X = root.create_group("X")
    X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": list(m.shape)})
    kw = {"compressor": _compressor(fmt, comp)} if fmt == 2 else {"compressors": _compressor(fmt, comp) or None}
    for name, arr, chunk in (("data", m.data, 97), ("indices", m.indices, 97), ("indptr", m.indptr, 13)):
        z = X.create_array(name, shape=arr.shape, chunks=(chunk,), dtype=arr.dtype, **kw)
        z[:] = arr
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})


def _matrix():
    rng = np.random.default_rng(0)
    m = sp.random(60, 40, density=0.2, format="csr", random_state=rng, dtype=np.float32)
    m.data = np.ceil(m.data * 9)
    return m


@pytest.mark.parametrize("fmt", [2, 3])
@pytest.mark.parametrize("comp", ["blosc", "zstd", "gzip", "none"])
def test_direct_reads_equal_zarr(tmp_path, monkeypatch, fmt, comp):
    m = _matrix()
    _store(tmp_path / "a.zarr", fmt, comp, m)
    calls = []
    real = nodes.read_direct
    monkeypatch.setattr(nodes, "read_direct", lambda n, s: calls.append(1) or real(n, s))
    got = read_matrix(tmp_path / "a.zarr", 40)
    assert calls and (got != m).nnz == 0
    assert np.array_equal(got.indptr, m.indptr) and np.array_equal(got.indices, m.indices)
    # the same store through zarr-python only
    monkeypatch.setattr(nodes, "read_direct", lambda n, s: None)
    via_zarr = read_matrix(tmp_path / "a.zarr", 40)
    assert np.array_equal(via_zarr.data, got.data) and np.array_equal(via_zarr.indices, got.indices)
    # and the direct path did take these arrays (not a silent fallback)
    z = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")["X/data"]
    np.testing.assert_array_equal(real(z, slice(5, 300)), m.data[5:300])


@pytest.mark.parametrize("fmt", [2, 3])
@pytest.mark.parametrize("name", ["data", "indices", "indptr"])
def test_missing_chunk_is_an_error_naming_it(tmp_path, fmt, name):
    m = _matrix()
    _store(tmp_path / "a.zarr", fmt, "blosc", m)
    d = tmp_path / "a.zarr" / "X" / name
    chunk = "1" if fmt == 2 else os.path.join("c", "1")
    os.remove(d / chunk)
    with pytest.raises(InputFileError, match=r"chunk .*missing"):
        read_matrix(tmp_path / "a.zarr", 40)  # the reader's check when opening the store, or the direct read
    # the direct read itself never hands out zeros for a missing chunk
    z = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")[f"X/{name}"]
    with pytest.raises(InputFileError, match=rf"chunk 1 of Zarr array 'X/{name}' is missing") as e:
        nodes.read_direct(z, slice(0, z.shape[0]))
    assert str(d / chunk) in str(e.value)


@pytest.mark.parametrize("fmt", [2, 3])
@pytest.mark.parametrize("comp", ["blosc", "zstd", "gzip"])
def test_short_chunk_inside_a_read_is_an_error(tmp_path, fmt, comp):
    """A whole chunk inside the read is decoded straight into the output only when its header says it fills
    the chunk: a valid but short chunk (from another array) must not leave the rest of the output unset."""
    import numcodecs

    m = _matrix()
    _store(tmp_path / "a.zarr", fmt, comp, m)
    z = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")["X/data"]
    codec = {"blosc": numcodecs.Blosc(cname="lz4", shuffle=1), "zstd": numcodecs.Zstd(level=3),
             "gzip": numcodecs.GZip(level=1)}[comp]
    chunk = tmp_path / "a.zarr" / "X" / "data" / ("1" if fmt == 2 else os.path.join("c", "1"))
    short = np.arange(50, dtype=m.data.dtype)
    chunk.write_bytes(codec.encode(short))
    with pytest.raises(InputFileError, match=r"chunk 1 of Zarr array 'X/data' is truncated"):
        nodes.read_direct(z, slice(0, 300))


def test_decoded_size_from_headers():
    import numcodecs

    from scfm_fast.readers._zarr_direct import decoded_size

    for n in (1, 100, 70_000):
        a = np.arange(n, dtype=np.float32)
        for c in (numcodecs.Blosc(cname="lz4"), numcodecs.Blosc(cname="zstd", shuffle=2), numcodecs.Zstd(level=3)):
            assert decoded_size(c, c.encode(a)) == a.nbytes
        assert decoded_size(numcodecs.GZip(), numcodecs.GZip().encode(a)) is None  # unknown: copied
    assert decoded_size(numcodecs.Zstd(), b"not a frame") is None


@pytest.mark.parametrize("fmt", [2, 3])
@pytest.mark.parametrize("comp", ["blosc", "zstd", "none"])
def test_a_chunk_split_between_consecutive_reads_is_decoded_once(tmp_path, monkeypatch, fmt, comp):
    """Consecutive blocks share the chunk at their boundary: the second read takes it from the first one's
    decode, and a chunk rewritten in between is decoded again, never served from the earlier bytes."""
    import scfm_fast.readers._zarr_direct as zd

    m = _matrix()
    _store(tmp_path / "a.zarr", fmt, comp, m)
    z = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")["X/data"]
    zd._PARTIAL.clear()
    decoded = []
    real = zd._decode
    monkeypatch.setattr(zd, "_decode", lambda codec, raw, path, k, *a, **kw: decoded.append(k) or real(
        codec, raw, path, k, *a, **kw))
    np.testing.assert_array_equal(zd.read_direct(z, slice(0, 150)), m.data[:150])  # ends inside chunk 1
    np.testing.assert_array_equal(zd.read_direct(z, slice(150, 250)), m.data[150:250])  # 1 again, ends in 2
    if comp != "none":
        assert decoded.count(1) == 1 and decoded.count(0) == 1 and decoded.count(2) == 1
    # chunk 2 rewritten (same length, other values) before the read that continues in it
    chunk = tmp_path / "a.zarr" / "X" / "data" / ("2" if fmt == 2 else os.path.join("c", "2"))
    new = m.data[194:291][::-1].copy() + 1
    z2 = zarr.open_group(str(tmp_path / "a.zarr"), mode="r+")["X/data"]
    z2[194:291] = new
    assert chunk.exists()
    np.testing.assert_array_equal(zd.read_direct(z, slice(250, 291)), new[250 - 194:])


@pytest.mark.parametrize("fmt", [2, 3])
def test_text_read_block_by_block_decodes_each_chunk_once(tmp_path, monkeypatch, fmt):
    """The obs index (one chunk of every cell, as AnnData writes it) read in blocks: zarr decodes the chunk
    once, not once per block; the names equal zarr's; a chunk rewritten in between is decoded again."""
    import scfm_fast.readers._zarr_direct as zd

    names = np.array([f"cell-{i}" for i in range(500)], dtype=object)
    path = str(tmp_path / "t.zarr")
    z = zarr.create_array(path, shape=(500,), chunks=(200,), dtype=str, zarr_format=fmt)
    z[:] = names
    z = zarr.open_array(path, mode="r")
    zd._DECODED.clear()
    reads = []
    real = type(z).__getitem__
    monkeypatch.setattr(type(z), "__getitem__", lambda self, sel: reads.append(sel) or real(self, sel))
    got = [nodes.to_str_array(zd.read_through_chunk(z, slice(s, s + 50))) for s in range(0, 500, 50)]
    np.testing.assert_array_equal(np.concatenate(got), names)
    assert len(reads) == 3  # chunks 0, 1, 2: one decode each for ten blocks
    np.testing.assert_array_equal(nodes.to_str_array(zd.read_through_chunk(z, slice(150, 450))), names[150:450])
    zarr.open_array(path, mode="r+")[400:500] = np.array([f"new-{i}" for i in range(100)], dtype=object)
    assert list(nodes.to_str_array(zd.read_through_chunk(z, slice(440, 442)))) == ["new-40", "new-41"]
    # not a local 1-D array, or a plain read already taken by the direct path: None
    assert zd.read_through_chunk(z, [1, 2]) is None


def _sharded_store(path, m: sp.csr_matrix, *, comp: str = "zstd", index_location: str = "end",
                   index_crc: bool = True) -> None:
    """A v3 AnnData-Zarr store whose CSR arrays are in shards of three (small) chunks each."""
    import pandas as pd
    from anndata.io import write_elem
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    write_elem(root, "var", pd.DataFrame(index=[f"g{j}" for j in range(m.shape[1])]))
    write_elem(root, "obs", pd.DataFrame(index=[f"c{i}" for i in range(m.shape[0])]))
    X = root.create_group("X")
    X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": list(m.shape)})
    inner = [BytesCodec()] + ([_compressor(3, comp)] if comp != "none" else [])
    index_codecs = [BytesCodec(), Crc32cCodec()] if index_crc else [BytesCodec()]
    for name, arr, chunk in (("data", m.data, 97), ("indices", m.indices, 97), ("indptr", m.indptr, 13)):
        codec = ShardingCodec(chunk_shape=(chunk,), codecs=inner, index_codecs=index_codecs,
                              index_location=index_location)
        z = X.create_array(name, shape=arr.shape, chunks=(3 * chunk,), dtype=arr.dtype, serializer=codec,
                           compressors=None)
        z[:] = arr
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})


@pytest.mark.parametrize("comp", ["blosc", "zstd", "gzip", "none"])
@pytest.mark.parametrize(("index_location", "index_crc"), [("end", True), ("start", True), ("end", False)])
def test_sharded_reads_are_direct_and_equal_zarr(tmp_path, monkeypatch, comp, index_location, index_crc):
    """zarr's sharding (the coming default for v3 arrays): chunks are found through each shard's index and
    decoded directly, in blocks that start and end inside shards and chunks."""
    import scfm_fast.readers._zarr_direct as zd

    m = _matrix()
    _sharded_store(tmp_path / "s.zarr", m, comp=comp, index_location=index_location, index_crc=index_crc)
    z = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["X/data"]
    assert zd._plan(z) is not None and zd._plan(z).per_shard == 3
    zd._PARTIAL.clear()
    for lo, hi in ((0, m.nnz), (5, 300), (291, 582), (290, 292), (600, m.nnz), (100, 100)):
        np.testing.assert_array_equal(zd.read_direct(z, slice(lo, hi)), m.data[lo:hi])
    calls = []
    real = nodes.read_direct
    monkeypatch.setattr(nodes, "read_direct",
                        lambda n, s: calls.append((n.path, real(n, s) is not None)) or real(n, s))
    got = read_matrix(tmp_path / "s.zarr", 40)
    x_reads = [direct for path, direct in calls if path.startswith("X/")]
    assert x_reads and all(x_reads)  # every read of indptr/indices/data took the direct path
    assert np.array_equal(got.indptr, m.indptr) and np.array_equal(got.indices, m.indices)
    assert np.array_equal(got.data, m.data)


def test_big_endian_v3_arrays_are_read_through_zarr(tmp_path):
    """A ``bytes`` codec storing big-endian values: the direct path declines it (it read such values
    byte-swapped: counts of 1.0 became 4.6e-41), and zarr's reads give the counts."""
    import pandas as pd
    from anndata.io import write_elem
    from zarr.codecs import BytesCodec

    import scfm_fast.readers._zarr_direct as zd

    m = _matrix()
    root = zarr.open_group(str(tmp_path / "be.zarr"), mode="w", zarr_format=3)
    write_elem(root, "var", pd.DataFrame(index=[f"g{j}" for j in range(m.shape[1])]))
    write_elem(root, "obs", pd.DataFrame(index=[f"c{i}" for i in range(m.shape[0])]))
    X = root.create_group("X")
    X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": list(m.shape)})
    for name, arr in (("data", m.data), ("indices", m.indices), ("indptr", m.indptr)):
        X.create_array(name, shape=arr.shape, chunks=(97,), dtype=arr.dtype, serializer=BytesCodec(endian="big"),
                       compressors=None)[:] = arr
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    z = zarr.open_group(str(tmp_path / "be.zarr"), mode="r")["X/data"]
    assert zd.read_direct(z, slice(0, 10)) is None
    got = read_matrix(tmp_path / "be.zarr", 40)
    assert (got != m).nnz == 0 and np.array_equal(got.indices, m.indices)


def _shard_file(store, name: str, s: int):
    return store / "X" / name / "c" / str(s)


def _damage(f, how: str, *, index_location: str = "end") -> None:
    raw = bytearray(f.read_bytes())
    n_index = 16 * 3 + 4
    index_at = len(raw) - n_index if index_location == "end" else 0
    if how == "absent chunk":  # chunk 1 of the shard marked unwritten (both fields all ones)
        raw[index_at + 16:index_at + 32] = b"\xff" * 16
        import numcodecs  # keep the index checksum valid: only the entry says the chunk is missing

        fixed = numcodecs.CRC32C().encode(np.frombuffer(bytes(raw[index_at:index_at + n_index - 4]), np.uint8))
        raw[index_at:index_at + n_index] = bytes(fixed)
    elif how == "bad checksum":
        raw[index_at + 3] ^= 0x40
    elif how == "truncated":
        raw = raw[:n_index - 8]
    elif how == "past the end":  # a chunk's length pointing beyond the file, checksum kept valid
        import numcodecs

        entry = np.frombuffer(bytes(raw[index_at + 24:index_at + 32]), "<u8")[0]
        raw[index_at + 24:index_at + 32] = int(entry + len(raw)).to_bytes(8, "little")
        fixed = numcodecs.CRC32C().encode(np.frombuffer(bytes(raw[index_at:index_at + n_index - 4]), np.uint8))
        raw[index_at:index_at + n_index] = bytes(fixed)
    f.write_bytes(bytes(raw))


@pytest.mark.parametrize(("how", "message"), [
    ("absent chunk", r"chunk 4 of Zarr array 'X/data' is missing from shard 1 \(its index marks it unwritten\)"),
    ("bad checksum", r"the chunk index of shard 1 of Zarr array 'X/data' is damaged \(.*checksum"),
    ("truncated", r"the chunk index of shard 1 of Zarr array 'X/data' is damaged \(the file has \d+ bytes"),
    ("past the end", r"chunk 4 of Zarr array 'X/data' is truncated \(shard 1's index places it"),
])
@pytest.mark.parametrize("index_location", ["end", "start"])
def test_damaged_shard_is_an_error_naming_it(tmp_path, how, message, index_location):
    """Never zeros or another chunk's bytes for a chunk a damaged shard cannot give."""
    import scfm_fast.readers._zarr_direct as zd

    m = _matrix()
    store = tmp_path / "s.zarr"
    _sharded_store(store, m, index_location=index_location)
    f = _shard_file(store, "data", 1)
    _damage(f, how, index_location=index_location)
    z = zarr.open_group(str(store), mode="r")["X/data"]
    zd._PARTIAL.clear()
    with pytest.raises(InputFileError, match=message) as e:
        zd.read_direct(z, slice(0, m.nnz))
    assert str(f) in str(e.value)
    np.testing.assert_array_equal(zd.read_direct(z, slice(0, 291)), m.data[:291])  # shard 0 still reads


def test_missing_shard_is_an_error_naming_it(tmp_path):
    import scfm_fast.readers._zarr_direct as zd

    m = _matrix()
    store = tmp_path / "s.zarr"
    _sharded_store(store, m)
    f = _shard_file(store, "indices", 1)
    os.remove(f)
    z = zarr.open_group(str(store), mode="r")["X/indices"]
    with pytest.raises(InputFileError, match=r"shard 1 of Zarr array 'X/indices' is missing") as e:
        zd.read_direct(z, slice(0, m.nnz))
    assert str(f) in str(e.value)
    with pytest.raises(InputFileError, match=r"missing"):
        read_matrix(store, 40)


def test_kept_chunks_are_bounded_over_many_stores(tmp_path):
    """One partly read chunk is kept per array, for the latest few arrays only: a worker that reads
    thousands of files in turn must not keep one chunk of each."""
    import scfm_fast.readers._zarr_direct as zd

    m = _matrix()
    zd._PARTIAL.clear()
    for i in range(MAX_KEPT + 5):
        _store(tmp_path / f"s{i}.zarr", 2, "blosc", m)
        z = zarr.open_group(str(tmp_path / f"s{i}.zarr"), mode="r")["X/data"]
        np.testing.assert_array_equal(zd.read_direct(z, slice(0, 150)), m.data[:150])  # ends inside chunk 1
    assert len(zd._PARTIAL) == MAX_KEPT
    assert any(k.startswith(str(tmp_path / f"s{MAX_KEPT + 4}.zarr")) for k in zd._PARTIAL)  # the latest kept
