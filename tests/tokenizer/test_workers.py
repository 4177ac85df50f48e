"""Worker processes (``--workers N``): the same dataset as the in-process loop, resume and errors intact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from scfm_fast._errors import CountDataError, ScfmError
from scfm_fast.store import writer as writer_mod
from scfm_fast.tokenizer import _run, pipeline
from scfm_fast.tokenizer.pipeline import tokenize_corpus
from scfm_fast.tokenizer.reference import rank_tokenize_ref
from scfm_fast.tokenizer.spec import TokenizerSpec
from tests._datasets import assert_same_shards_and_packed

ad = pytest.importorskip("anndata")
DEMO = Path(__file__).resolve().parents[2] / "scfm_fast" / "data" / "demo" / "pbmc_200cells.h5ad"
CHUNK = 30


@pytest.fixture(autouse=True)
def _workers_on_small_inputs(monkeypatch):
    monkeypatch.setattr(_run, "MIN_WORKER_CELLS", 0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The real PBMC cells as h5ad and Zarr (two files: one run spans both)."""
    d = tmp_path_factory.mktemp("workers_src")
    a = ad.read_h5ad(DEMO)
    a.obs["group"] = np.where(np.arange(a.n_obs) % 3 == 0, "x", "y")
    a.write_h5ad(d / "a.h5ad")
    a[::-1].copy().write_zarr(d / "b.zarr")
    return [d / "a.h5ad", d / "b.zarr"], a


def _run_tok(src, out, n, **kw):
    return tokenize_corpus(src, out, chunk_size=CHUNK, n_threads=n, progress_bar=False, obs_columns=["group"],
                           **kw)


def _same_dataset(a: Path, b: Path) -> None:
    assert_same_shards_and_packed(a, b)
    ma, mb = (json.loads((x / "__scfm__/manifest.json").read_text()) for x in (a, b))
    assert ma["status"] == mb["status"] == "complete"
    # a resumed run records the redone shards last: compare the records, not their order
    def recs(m):
        return sorted(m["shards"], key=lambda r: r["file"])

    assert recs(ma) == recs(mb) and ma["n_tokens"] == mb["n_tokens"]


@pytest.mark.parametrize("kw", [{}, {"keep_counts": True, "qc": "genecompass"}])
def test_workers_equal_in_process_and_reference(tmp_path, inputs, kw):
    srcs, a = inputs
    _run_tok(srcs, tmp_path / "one", 1, **kw)
    man = _run_tok(srcs, tmp_path / "two", 2, **kw)
    _same_dataset(tmp_path / "one", tmp_path / "two")
    # and both equal the NumPy reference on the h5ad's cells (file 0), cell for cell
    spec = TokenizerSpec.build()  # the symbols resolve through Geneformer's bundled symbol table
    col, _ = spec.resolve(a.var_names, source="pbmc")
    vocab = spec.vocab
    m = sp.csr_matrix(a.X)
    toks, offs, _ = rank_tokenize_ref(m.indptr, m.indices, m.data, col_token=col, token_median=vocab.token_median,
                                      max_len=2048, totals=np.asarray(a.obs["n_counts"], dtype=np.float64))
    got = pq.read_table(tmp_path / "two", filters=[("file_index", "=", 0)]).sort_by("cell_index")
    assert got.num_rows == a.n_obs - sum(f["n_dropped"] for f in man.get("qc", {}).get("files", [])[:1])
    for i, ids in zip(got.column("cell_index").to_pylist(), got.column("input_ids").to_pylist()):
        assert ids == toks[offs[i]:offs[i + 1]].tolist()
    assert man["summary"]["n_cells_in"] == 2 * a.n_obs


def test_worker_failure_resumes_to_the_same_dataset(tmp_path, inputs, monkeypatch):
    srcs, _ = inputs
    _run_tok(srcs, tmp_path / "ref", 1)
    real = writer_mod.ShardFiles.write

    def fail_once(self, table, name):
        if name == writer_mod.shard_name(1, 2 * CHUNK):
            raise OSError(28, "No space left on device")
        return real(self, table, name)

    monkeypatch.setattr(writer_mod.ShardFiles, "write", fail_once)  # inherited by the forked workers
    out = tmp_path / "o"
    with pytest.raises(OSError, match="No space left"):
        _run_tok(srcs, out, 2)
    man = json.loads((out / "__scfm__/manifest.json").read_text())
    assert man["status"] == "in_progress"
    # every shard file a worker finished is recorded: a failed run leaves no unrecorded shard behind
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(s["file"] for s in writer_mod.recorded_shards(out))
    monkeypatch.setattr(writer_mod.ShardFiles, "write", real)
    _run_tok(srcs, out, 2, resume=True)
    _same_dataset(tmp_path / "ref", out)


def test_a_workers_last_shard_that_failed_to_write_stops_the_run(tmp_path, inputs, monkeypatch, capfd):
    """The last shard is written as the pool shuts down (writes overlap the next chunk): its failure has no
    later result to surface in, so the missing file stops the run, and the worker names the error."""
    srcs, _ = inputs
    _run_tok(srcs, tmp_path / "ref", 1)
    real = writer_mod.ShardFiles.write
    last = writer_mod.shard_name(1, 180)  # the last chunk of the 200 cells of the second file

    def fail_last(self, table, name):
        if name == last:
            raise OSError(28, "No space left on device")
        return real(self, table, name)

    monkeypatch.setattr(writer_mod.ShardFiles, "write", fail_last)
    out = tmp_path / "o"
    with pytest.raises(ScfmError, match=f"{last}: not written by their worker.*--resume"):
        _run_tok(srcs, out, 2)
    assert f"writing {last} failed: [Errno 28] No space left on device" in capfd.readouterr().err
    recorded = sorted(s["file"] for s in writer_mod.recorded_shards(out))
    assert last not in recorded and len(recorded) == 2 * (200 // CHUNK + 1) - 1  # all the others
    assert sorted(p.name for p in out.glob("*.parquet")) == recorded
    monkeypatch.setattr(writer_mod.ShardFiles, "write", real)
    _run_tok(srcs, out, 2, resume=True)
    _same_dataset(tmp_path / "ref", out)


def test_a_worker_killed_while_writing_leaves_no_recorded_partial_shard(tmp_path, inputs, monkeypatch):
    """A worker dying mid-write (e.g. the OOM killer) while its next chunk is ranked: the pool breaks, the
    shard is not recorded (its files never reached their final names), and --resume completes the run."""
    srcs, _ = inputs
    _run_tok(srcs, tmp_path / "ref", 1)
    real = writer_mod.ShardFiles.write
    victim = writer_mod.shard_name(0, 3 * CHUNK)

    def die_in_write(self, table, name):
        if name == victim:
            self.write_part(table, name)  # the packed part is in place, the Parquet shard is not
            os._exit(9)
        return real(self, table, name)

    monkeypatch.setattr(writer_mod.ShardFiles, "write", die_in_write)
    out = tmp_path / "o"
    with pytest.raises(ScfmError, match="worker process died"):
        _run_tok(srcs, out, 2)
    recorded = {s["file"] for s in writer_mod.recorded_shards(out)}
    assert victim not in recorded
    assert recorded <= {p.name for p in out.glob("*.parquet")}
    monkeypatch.setattr(writer_mod.ShardFiles, "write", real)
    _run_tok(srcs, out, 2, resume=True)
    _same_dataset(tmp_path / "ref", out)


def test_bad_count_in_a_worker_names_cell_and_gene(tmp_path, inputs):
    _, a = inputs
    b = a.copy()
    x = sp.csr_matrix(b.X).astype(np.float32)
    x.data[x.indptr[100] + 2] = 2.5  # row 100, in the fourth chunk
    b.X = x
    b.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(CountDataError, match=r"bad.h5ad: cell '.+' \(row 100\), gene '.+': a non-integer count"):
        _run_tok(tmp_path / "bad.h5ad", tmp_path / "o", 2)


def test_one_worker_runs_in_process(tmp_path, inputs, monkeypatch):
    """``--workers 1`` runs one process, whatever the input's size."""
    srcs, _ = inputs

    def refuse(*a, **k):
        raise AssertionError("worker processes started with --workers 1")

    monkeypatch.setattr(pipeline, "run_workers", refuse)
    man = tokenize_corpus(srcs, tmp_path / "o", chunk_size=CHUNK, n_threads=1, progress_bar=False)
    assert man["status"] == "complete"


def test_default_is_one_worker_per_core(tmp_path, inputs, monkeypatch):
    """Left out, ``--workers`` is the number of usable cores, capped at MAX_DEFAULT_WORKERS."""
    monkeypatch.setattr(_run.os, "sched_getaffinity", lambda pid: set(range(3)), raising=False)
    assert _run.n_workers(None) == 3
    monkeypatch.setattr(_run.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert _run.n_workers(None) == _run.MAX_DEFAULT_WORKERS
    assert _run.n_workers(5) == 5
    monkeypatch.setattr(_run.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    seen = []
    real = pipeline.run_workers

    def spy(*a, **k):
        seen.append(k["workers"])
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "run_workers", spy)
    srcs, _ = inputs
    man = tokenize_corpus(srcs, tmp_path / "o", chunk_size=CHUNK, progress_bar=False)
    assert man["status"] == "complete" and seen == [2]
