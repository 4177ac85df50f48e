"""``scfm`` turns OS errors and damaged outputs into one-line errors that say whether --resume continues."""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest

from scfm_fast.cli import main
from scfm_fast.store import TokenStore, read_manifest, read_table
from scfm_fast.store import packed as packed_mod
from scfm_fast.store import writer as writer_mod
from scfm_fast.tokenizer.pipeline import tokenize_corpus
from scfm_fast.vocab import GeneVocab
from tests._data import make_counts_adata


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("err_src")
    make_counts_adata(GeneVocab.load(), n_cells=45, n_genes=70).write_h5ad(d / "c.h5ad")
    tokenize_corpus(d / "c.h5ad", d / "ref", chunk_size=10, progress_bar=False)
    return d / "c.h5ad", d / "ref"


def _tok(src, out, *extra):
    return main(["tokenize", str(src), "--out", str(out), "--chunk-size", "10", *extra])


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _same_as_ref(out, ref):
    assert read_table(out).column("input_ids").equals(read_table(ref).column("input_ids"))
    np.testing.assert_array_equal(np.asarray(TokenStore(out).tokens), np.asarray(TokenStore(ref).tokens))


def _resumes_after_the_fix(src, out, ref, fix):
    """No temporary file is left, nothing is marked complete, and --resume finishes the same dataset."""
    assert sorted(p.name for p in out.rglob("*") if p.name.endswith(".tmp")) == []
    assert read_manifest(out, require_complete=False)["status"] == "in_progress"
    fix()
    assert _tok(src, out, "--resume") == 0
    _same_as_ref(out, ref)


@pytest.mark.parametrize("err,code,fix", [
    (errno.ENOSPC, "ENOSPC", "free disk space"),
    (errno.EACCES, "EACCES", "fix the permissions"),
    (errno.EROFS, "EROFS", "choose a writable --out"),
])
def test_write_failure_is_one_line_and_resume_continues(tmp_path, source, monkeypatch, capsys, err, code, fix):
    # tests run as root, where chmod stops nothing: the OS error is raised where the third shard is written
    src, ref = source
    out = tmp_path / "o"
    real = packed_mod.write_table  # what writes each shard file (its token lists directly, the rest via pyarrow)
    calls = {"n": 0}

    def failing(table, where, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            where.write(b"PAR1")  # a partial file first, as a full disk leaves (where: the shard's sink)
            exc = PermissionError if err in (errno.EACCES,) else OSError
            raise exc(err, __import__("os").strerror(err), where.name)
        return real(table, where, **kw)

    monkeypatch.setattr(packed_mod, "write_table", failing)
    assert _tok(src, out) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("scfm tokenize: error: ") and f"[{code}]" in line and fix in line
    assert str(out) in line and "--resume" in line
    _resumes_after_the_fix(src, out, ref, lambda: monkeypatch.setattr(packed_mod, "write_table", real))


def test_failed_finalisation_removes_its_temporary_files(tmp_path, source, monkeypatch, capsys):
    src, ref = source
    out = tmp_path / "o"
    real = writer_mod._NpyAppender.write

    def full(self, block):
        if self.written > 0:
            raise OSError(errno.ENOSPC, "No space left on device", self.f.name)
        real(self, block)

    monkeypatch.setattr(writer_mod._NpyAppender, "write", full)
    assert _tok(src, out) == 2
    assert "[ENOSPC]" in _one_line(capsys.readouterr().err)
    assert not (out / "__scfm__" / "packed").exists()
    _resumes_after_the_fix(src, out, ref, lambda: monkeypatch.setattr(writer_mod._NpyAppender, "write", real))


def test_vanished_output_directory(tmp_path, source, monkeypatch, capsys):
    src, _ = source
    out = tmp_path / "o"
    real = writer_mod.ShardedTokenWriter.write_shard

    def vanish(self, *a, **k):
        shutil.rmtree(out)
        return real(self, *a, **k)

    monkeypatch.setattr(writer_mod.ShardedTokenWriter, "write_shard", vanish)
    assert _tok(src, out) == 2
    line = _one_line(capsys.readouterr().err)
    assert "[ENOENT]" in line and "check that the path still exists" in line


def test_truncated_manifest_is_a_clear_error(tmp_path, source, capsys):
    src, _ = source
    out = tmp_path / "o"
    assert _tok(src, out) == 0
    capsys.readouterr()
    man = out / "__scfm__" / "manifest.json"
    man.write_text(man.read_text()[:100])
    assert _tok(src, out, "--resume") == 2
    line = _one_line(capsys.readouterr().err)
    assert "manifest is damaged" in line and "--overwrite" in line
    with pytest.raises(Exception, match="manifest is damaged"):
        read_table(out)
    assert _tok(src, out, "--overwrite") == 0  # and the documented way out works


def test_zero_cells_is_an_error_not_a_complete_dataset(tmp_path, source, capsys):
    import anndata as ad

    a = ad.read_h5ad(source[0])
    a.obs["filter_pass"] = 0
    a.write_h5ad(tmp_path / "none.h5ad")
    out = tmp_path / "o"
    assert _tok(tmp_path / "none.h5ad", out) == 2
    line = _one_line(capsys.readouterr().err)
    assert "no cell to write" in line and "45 have filter_pass != 1" in line
    assert read_manifest(out, require_complete=False)["status"] != "complete"


def test_medians_write_failure(tmp_path, source, monkeypatch, capsys):
    import pickle

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "m" / "x.tmp"))

    monkeypatch.setattr(pickle, "dump", full)
    assert main(["medians", str(source[0]), "--out", str(tmp_path / "m")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("scfm medians: error:") and "[ENOSPC]" in line and "rerun the command" in line
    assert not list((tmp_path / "m").glob("*.tmp"))


def test_lock_file_is_not_left_by_a_finished_medians_run(tmp_path, source):
    assert main(["medians", str(source[0]), "--out", str(tmp_path / "m")]) == 0
    assert not (tmp_path / "m" / ".scfm.lock").exists()
    assert json.loads((tmp_path / "m" / "medians_report.json").read_text())["n_cells"] == 45
