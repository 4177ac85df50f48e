"""A corpus of more input files than the process may hold open (``ulimit -n``): every input is opened only
while it is resolved or its cells are read, in the parent, in the in-process loop and in the workers."""

from __future__ import annotations

import errno
import os
import resource
import sys
from pathlib import Path

import numpy as np
import pytest

from scfm_fast._errors import InputFileError
from scfm_fast.readers._common import open_error
from scfm_fast.readers.h5ad import H5adReader
from scfm_fast.tokenizer import _run
from scfm_fast.tokenizer.pipeline import tokenize_corpus
from tests._datasets import assert_same_shards_and_packed

ad = pytest.importorskip("anndata")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
DEMO = Path(__file__).resolve().parents[2] / "scfm_fast" / "data" / "demo" / "pbmc_200cells.h5ad"
N_FILES = 48


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """48 small h5ad files of the real PBMC cells (20-25 cells each)."""
    d = tmp_path_factory.mktemp("many_src")
    a = ad.read_h5ad(DEMO)
    paths = []
    for i in range(N_FILES):
        p = d / f"part{i:02d}.h5ad"
        a[np.arange(i, i + 20 + i % 6) % a.n_obs].copy().write_h5ad(p)
        paths.append(p)
    return paths


class _FdLimit:
    """Lowers the soft ``RLIMIT_NOFILE`` to the descriptors open now plus ``room`` (restored on exit)."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __enter__(self) -> None:
        self.saved = resource.getrlimit(resource.RLIMIT_NOFILE)
        soft = len(os.listdir("/proc/self/fd")) + self.room
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, self.saved[1]))

    def __exit__(self, *exc) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, self.saved)


@pytest.mark.parametrize("workers", [1, 2])
def test_more_files_than_open_file_limit(tmp_path, many, workers, monkeypatch):
    monkeypatch.setattr(_run, "MIN_WORKER_CELLS", 0)
    kw = {"chunk_size": 16, "n_threads": workers, "progress_bar": False}
    ref = tokenize_corpus(many, tmp_path / "ref", **kw)
    # 30 descriptors to spare: holding the 48 inputs open at once (as before) fails with EMFILE
    with _FdLimit(30):
        got = tokenize_corpus(many, tmp_path / "low", **kw)
    assert got["status"] == "complete" and got["n_cells"] == ref["n_cells"] == sum(
        20 + i % 6 for i in range(N_FILES))
    assert_same_shards_and_packed(tmp_path / "ref", tmp_path / "low")


def test_worker_keeps_few_files_open(many, monkeypatch):
    """A worker's readers: at most MAX_OPEN_PER_WORKER, the least recently used closed first."""
    opened: list = []

    def fake_open(path, **kw):
        r = H5adReader(path)
        opened.append(r)
        return r

    import scfm_fast.readers as readers_mod

    monkeypatch.setattr(readers_mod, "open_reader", fake_open)
    cache: dict = {}
    monkeypatch.setattr(_run, "_JOB", {"readers": cache, "reader_kw": {}, "chunk_size": 10})
    for fi in (0, 1, 2, 3, 4, 1, 5):
        r = _run._open_for_chunk(fi, str(many[fi]))
        assert not getattr(r, "_closed", False) and r.path == str(many[fi])
        assert len(cache) <= _run.MAX_OPEN_PER_WORKER
    assert list(cache) == [3, 4, 1, 5]  # 0 and 2 were the least recently used
    assert [getattr(r, "_closed", False) for r in opened] == [True, False, True, False, False, False]


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE])
def test_too_many_open_files_is_not_called_damaged(tmp_path, many, monkeypatch, code):
    import h5py

    def refuse(*a, **k):
        raise OSError(code, "Unable to synchronously open file (errno = 24, 'Too many open files')")

    monkeypatch.setattr(h5py, "File", refuse)
    with pytest.raises(InputFileError) as e:
        H5adReader(many[0])
    msg = str(e.value)
    assert str(many[0]) in msg and "too many open files" in msg and "ulimit -n" in msg
    assert "damaged" not in msg


def test_open_error_permission_and_damage():
    denied = open_error("/x/a.h5ad", PermissionError(errno.EACCES, "denied"), kind="h5ad file", fix="F.")
    assert "permission denied" in str(denied) and "damaged" not in str(denied)
    bad = open_error("/x/a.h5ad", OSError("file signature not found"), kind="h5ad file", fix="Write it again.")
    assert "damaged" in str(bad) and "h5ad file" in str(bad) and str(bad).endswith("Write it again.")


def test_cli_names_the_fix_for_too_many_open_files():
    """Any other EMFILE (a pipe, an output file) reaches the CLI's one-line OS error, with the fix."""
    from scfm_fast.cli import os_error_message

    msg = os_error_message(OSError(errno.EMFILE, "Too many open files"), command="tokenize")
    assert "[EMFILE]" in msg and "ulimit -n" in msg and "--resume" in msg
