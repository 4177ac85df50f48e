"""Local Zarr stores opened from their metadata files (no zarr-python) describe and read as zarr does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import scfm_fast.readers._zarr_direct as zd
from scfm_fast.readers._nodes import is_array, to_str_array
from scfm_fast.readers._zarr_local import LocalArray, LocalGroup, open_local_group

zarr = pytest.importorskip("zarr")

STORES = ["zarr_v2", "zarr_v3", "zarr_v2_dense", "zarr_v3_dense", "zarr_legacy"]


def _walk(local, ref, path=""):
    """Compare two trees node by node; yields each pair of arrays."""
    assert list(local.keys()) == sorted(str(k) for k in ref.keys()), path
    assert dict(local.attrs) == dict(ref.attrs), path
    for name in ref.keys():
        a, b = local[name], ref[name]
        assert is_array(a) == is_array(b), f"{path}/{name}"
        if is_array(b):
            yield f"{path}/{name}", a, b
        else:
            yield from _walk(a, b, f"{path}/{name}")


def _same_values(a, b) -> None:
    if b.dtype.kind in "OTSU":
        np.testing.assert_array_equal(to_str_array(np.asarray(a)), to_str_array(np.asarray(b)))
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", STORES)
def test_local_nodes_describe_and_read_the_store_as_zarr_does(sources, name):
    path = str(sources[name].path)
    local, ref = open_local_group(path), zarr.open_group(path, mode="r")
    assert isinstance(local, LocalGroup)
    arrays = list(_walk(local, ref))
    assert arrays
    for where, a, b in arrays:
        assert a.shape == b.shape and a.chunks == b.chunks, where
        assert a.shards == getattr(b, "shards", None), where
        assert a.dtype == b.dtype or (a.dtype.kind == "O" and b.dtype.kind in "OT"), where
        assert dict(a.attrs) == dict(b.attrs), where
        _same_values(a[...], b[...])
        if a.ndim == 1 and a.shape[0] > 3:
            for sel in (slice(1, 3), slice(2, None), slice(0, 0)):
                _same_values(a[sel], b[sel])
    assert "X" in local and "nothing" not in local and "obs/nothing" not in local
    with pytest.raises(KeyError):
        local["nothing"]


def test_text_and_numbers_are_decoded_here_and_the_rest_by_zarr(sources):
    """The var index (text) and the CSR arrays are read without zarr-python; a 2-D array is read by zarr's
    own array at the same path."""
    for name in ("zarr_v2", "zarr_v3"):
        root = open_local_group(str(sources[name].path))
        index = root["var"][root["var"].attrs["_index"]]
        assert isinstance(index, LocalArray) and index.chunk_decoder is not None
        names = index[...]
        assert index._zarr_node is None and names.dtype == object and isinstance(names[0], str)
        data = root["X"]["data"]
        assert zd._plan(data) is not None
        data[...]
        assert data._zarr_node is None
        dense = open_local_group(str(sources[f"{name}_dense"].path))["X"]
        assert dense.ndim == 2
        dense[0:3]
        assert dense._zarr_node is not None  # an N-D read: zarr's


def test_a_missing_text_chunk_reads_as_zarr_reads_it(tmp_path):
    """A text chunk that is not there: zarr's answer (its fill value), as before this module."""
    path = str(tmp_path / "t.zarr")
    root = zarr.open_group(path, mode="w", zarr_format=3)
    z = root.create_array("names", shape=(6,), chunks=(3,), dtype=str)
    z[:] = np.array(["a", "b", "c", "d", "e", "f"], dtype=object)
    os.remove(os.path.join(path, "names", "c", "1"))
    local = open_local_group(path)["names"]
    _same_values(local[...], zarr.open_group(path, mode="r")["names"][...])
    assert list(to_str_array(local[0:3])) == ["a", "b", "c"]


@pytest.mark.parametrize(("encoding", "where"), [({"name": "default", "separator": "."}, "c.1"),
                                                 ({"name": "v2", "separator": "."}, "1"),
                                                 ({"name": "default", "separator": "/"}, "c/1")])
def test_v3_chunk_key_encodings(tmp_path, encoding, where):
    path = str(tmp_path / "k.zarr")
    root = zarr.open_group(path, mode="w", zarr_format=3)
    values = np.arange(20, dtype=np.float32)
    z = root.create_array("x", shape=(20,), chunks=(8,), dtype="float32", chunk_key_encoding=encoding)
    z[:] = values
    assert os.path.exists(os.path.join(path, "x", *where.split("/")))
    local = open_local_group(path)["x"]
    assert zd._plan(local).file(1) == os.path.join(path, "x", *where.split("/"))
    np.testing.assert_array_equal(local[3:19], values[3:19])
    assert local._zarr_node is None


def test_arrays_this_module_does_not_describe_come_from_zarr(tmp_path):
    """A v3 data type not known here is zarr's node; a directory that is no store is for zarr to refuse."""
    path = str(tmp_path / "d.zarr")
    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.create_array("when", shape=(3,), dtype="datetime64[s]")[:] = np.array(["2020-01-01"] * 3,
                                                                                dtype="datetime64[s]")
    node = open_local_group(path)["when"]
    assert not isinstance(node, LocalArray) and isinstance(node, zarr.Array)
    os.makedirs(tmp_path / "empty.zarr")
    assert open_local_group(tmp_path / "empty.zarr") is None


def test_reading_a_zarr_store_imports_neither_zarr_nor_h5py(sources, tmp_path):
    """What ``scfm tokenize`` does with a Zarr store (open, var names, every chunk with the obs index)
    imports neither zarr-python (~0.25 s) nor h5py."""
    code = textwrap.dedent(f"""
        import sys
        from scfm_fast.readers import open_reader
        for name in ({str(sources['zarr_v2'].path)!r}, {str(sources['zarr_v3'].path)!r}):
            r = open_reader(name)
            r.var_names
            n = sum(len(c.meta.index) for c in r.iter_chunks(chunk_size=7))
            assert n == r.n_obs, (n, r.n_obs)
        print(sorted(m for m in ("zarr", "h5py") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_damaged_metadata_is_an_error_naming_the_file(sources, tmp_path):
    """A metadata file that is not JSON (an interrupted copy): the reader's error names that file."""
    import shutil

    from scfm_fast._errors import InputFileError
    from scfm_fast.readers import open_reader

    store = tmp_path / "bad.zarr"
    shutil.copytree(sources["zarr_v2"].path, store)
    (store / "X" / "data" / ".zarray").write_text("{not json")
    with pytest.raises(InputFileError, match=r"bad\.zarr/X/data/\.zarray: damaged Zarr metadata"):
        open_reader(store)
