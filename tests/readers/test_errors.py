"""Bad inputs fail with InputFileError messages that name the file and say what to do."""

from __future__ import annotations

import h5py
import pytest

from scfm_fast._errors import InputFileError
from scfm_fast.readers import open_reader

from ._build import write_h5_without_x


def _raises(path, **kwargs) -> str:
    with pytest.raises(InputFileError) as info:
        open_reader(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    return message


@pytest.mark.parametrize("name", ["missing.h5ad", "missing.zarr", "missing.loom", "missing"])
def test_missing_path(tmp_path, name):
    assert "no such" in _raises(tmp_path / name)


@pytest.mark.parametrize("name", ["empty.h5ad", "empty.loom"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    assert "empty" in _raises(path)


def test_empty_directory(tmp_path):
    path = tmp_path / "nothing.zarr"
    path.mkdir()
    assert "empty directory" in _raises(path)


@pytest.mark.parametrize("name", ["cells.csv", "cells.h5", "cells"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("gene,count\n")
    message = _raises(path)
    assert ".h5ad" in message and "unsupported" in message


def test_not_hdf5(tmp_path):
    path = tmp_path / "text.h5ad"
    path.write_text("this is not HDF5")
    assert "HDF5" in _raises(path)


def test_directory_that_is_not_zarr(tmp_path):
    path = tmp_path / "folder.zarr"
    path.mkdir()
    (path / "readme.txt").write_text("hello")
    assert "Zarr" in _raises(path)


def test_h5ad_without_x(tmp_path):
    path = tmp_path / "no_x.h5ad"
    write_h5_without_x(path)
    assert "X" in _raises(path)


def test_hdf5_that_is_not_anndata(tmp_path):
    path = tmp_path / "other.h5ad"
    with h5py.File(path, "w") as f:
        f.create_dataset("matrix", data=[[1, 2]])
    assert "not an AnnData" in _raises(path)


@pytest.mark.parametrize("name", ["h5ad_layer", "zarr_v3", "loom"])
def test_missing_layer(sources, name):
    message = _raises(sources[name].path, layer="spliced")
    assert "'spliced'" in message and "available layers" in message
    if name != "zarr_v3":
        assert "'counts'" in message


def test_missing_raw(sources):
    assert "raw" in _raises(sources["h5ad_csr"].path, use_raw=True)


def test_layer_and_raw_together(sources):
    assert "cannot be combined" in _raises(sources["h5ad_layer"].path, layer="counts", use_raw=True)


@pytest.mark.parametrize("name", ["h5ad_csr", "zarr_v2", "zarr_legacy", "loom"])
def test_missing_gene_column(sources, name):
    message = _raises(sources[name].path, gene_id_column="ensembl")
    assert "'ensembl'" in message
    assert ("'Accession'" if name == "loom" else "'gene_ids'") in message


@pytest.mark.parametrize("name", ["h5ad_csr", "zarr_v3", "zarr_legacy", "loom"])
def test_missing_obs_column(sources, name):
    with open_reader(sources[name].path) as reader:
        with pytest.raises(InputFileError) as info:
            reader.iter_chunks(obs_columns=["n_counts", "batch"])
    message = str(info.value)
    assert str(sources[name].path) in message
    assert "'batch'" in message and "'n_counts'" in message and "'filter_pass'" in message


@pytest.mark.parametrize("name", ["h5ad_csr", "loom", "zarr_v3"])
def test_close_is_idempotent_and_a_closed_reader_says_so(sources, name):
    reader = open_reader(sources[name].path)
    assert next(reader.iter_chunks(chunk_size=4)).n_cells == 4
    reader.close()
    reader.close()
    with pytest.raises(ValueError, match="reader was closed") as info:
        next(reader.iter_chunks(chunk_size=4))
    assert str(sources[name].path) in str(info.value)
