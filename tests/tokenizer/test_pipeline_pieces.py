"""Chunks tokenized in pieces (:mod:`scfm_fast.tokenizer._pieces`): cut at chunk boundaries, and the
dataset equal cell for cell (tables, packed store, manifest records) to one made from whole chunks, in
this process and in worker processes, with filtering, QC and ``keep_counts``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from scfm_fast.readers.base import CellChunk
from scfm_fast.tokenizer import _pieces, _run
from scfm_fast.tokenizer.pipeline import tokenize_corpus
from scfm_fast.tokenizer.reference import rank_tokenize_ref
from scfm_fast.tokenizer.spec import TokenizerSpec
from tests._datasets import assert_same_shards_and_packed

ad = pytest.importorskip("anndata")
DEMO = Path(__file__).resolve().parents[2] / "scfm_fast" / "data" / "demo" / "pbmc_200cells.h5ad"
CHUNK = 30


def _chunk(start: int, n: int, rng) -> CellChunk:
    m = sp.random(n, 12, density=0.4, format="csr", random_state=rng, dtype=np.float32)
    m.data[:] = rng.integers(1, 9, m.nnz)
    obs = pd.DataFrame({"x": np.arange(start, start + n)}, index=[f"c{i}" for i in range(start, start + n)])
    return CellChunk(start, m.indptr.astype(np.int64), m.indices.astype(np.int32), m.data, obs)


def test_chunk_pieces_cut_at_chunk_boundaries():
    rng = np.random.default_rng(0)
    n_obs, chunk = 23, 10
    stream = [_chunk(s, min(7, n_obs - s), rng) for s in range(3, n_obs, 7)]  # resumed at row 3
    out = list(_pieces.chunk_pieces(iter(stream), chunk_size=chunk, n_obs=n_obs))
    assert [(p.start, p.stop, last) for p, last in out] == [
        (3, 10, True), (10, 17, False), (17, 20, True), (20, 23, True)]
    whole = sp.vstack([sp.csr_matrix((c.data, c.indices, c.indptr), shape=(c.n_cells, 12)) for c in stream])
    for p, _ in out:
        assert p.indptr[0] == 0 and p.indptr[-1] == p.indices.size == p.data.size
        got = sp.csr_matrix((p.data, p.indices, p.indptr), shape=(p.n_cells, 12))
        assert (got != whole[p.start - 3:p.stop - 3]).nnz == 0
        assert list(p.obs["x"]) == list(range(p.start, p.stop))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Real PBMC cells, a filter column, and a second file (one run spans both)."""
    d = tmp_path_factory.mktemp("pieces_src")
    a = ad.read_h5ad(DEMO)
    a.obs["filter_pass"] = (np.arange(a.n_obs) % 11 != 4).astype(np.int8)
    a.obs["group"] = np.where(np.arange(a.n_obs) % 3 == 0, "x", "y")
    a.write_h5ad(d / "a.h5ad")
    a[::-1].copy().write_zarr(d / "b.zarr")
    return [d / "a.h5ad", d / "b.zarr"], a


def _records(out: Path) -> list[dict]:
    man = json.loads((out / "__scfm__/manifest.json").read_text())
    assert man["status"] == "complete"
    return sorted(man["shards"], key=lambda r: r["file"])


def _same_dataset(a: Path, b: Path) -> None:
    assert_same_shards_and_packed(a, b)
    assert _records(a) == _records(b)  # shard statistics (counts sums included) summed over the pieces


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kw", [{}, {"keep_counts": True, "qc": "genecompass"}])
def test_pieces_equal_whole_chunks(tmp_path, inputs, monkeypatch, workers, kw):
    srcs, a = inputs
    monkeypatch.setattr(_run, "MIN_WORKER_CELLS", 0)

    def run(out, piece):
        monkeypatch.setattr(_pieces, "PIECE_CELLS", piece)
        monkeypatch.setattr(_pieces, "WORKER_PIECE_CELLS", piece)
        return tokenize_corpus(srcs, out, chunk_size=CHUNK, n_threads=workers, progress_bar=False,
                               obs_columns=["group"], **kw)

    run(tmp_path / "whole", CHUNK)
    man = run(tmp_path / "pieces", 7)  # 7 does not divide 30: pieces straddle chunk ends and are cut
    _same_dataset(tmp_path / "whole", tmp_path / "pieces")
    assert man["summary"]["n_filtered"] > 0
    # and the tokens equal the NumPy reference (file 0), cell for cell
    spec = TokenizerSpec.build()
    col, _ = spec.resolve(a.var_names, source="pbmc")
    m = sp.csr_matrix(a.X)
    toks, offs, _ = rank_tokenize_ref(m.indptr, m.indices, m.data, col_token=col,
                                      token_median=spec.vocab.token_median, max_len=2048,
                                      totals=np.asarray(a.obs["n_counts"], dtype=np.float64))
    got = pq.read_table(tmp_path / "pieces", filters=[("file_index", "=", 0)]).sort_by("cell_index")
    assert got.num_rows > 0
    for i, ids in zip(got.column("cell_index").to_pylist(), got.column("input_ids").to_pylist()):
        assert ids == toks[offs[i]:offs[i + 1]].tolist()


def test_resume_skips_finished_chunks_between_pieces(tmp_path, inputs, monkeypatch):
    """A resumed run whose done shards are not a prefix (a worker run) re-does only the missing ones."""
    srcs, _ = inputs
    monkeypatch.setattr(_pieces, "PIECE_CELLS", 7)
    monkeypatch.setattr(_pieces, "WORKER_PIECE_CELLS", 7)
    tokenize_corpus(srcs, tmp_path / "ref", chunk_size=CHUNK, progress_bar=False)
    out = tmp_path / "o"
    tokenize_corpus(srcs, out, chunk_size=CHUNK, progress_bar=False)
    man_path = out / "__scfm__/manifest.json"
    man = json.loads(man_path.read_text())
    drop = {"part-0000-000000000060.parquet", "part-0001-000000000120.parquet"}
    man["shards"] = [s for s in man["shards"] if s["file"] not in drop]
    man["status"] = "in_progress"
    for k in ("n_cells", "n_tokens", "packed", "summary"):
        man.pop(k, None)
    man_path.write_text(json.dumps(man))
    for name in drop:
        (out / name).unlink()
    tokenize_corpus(srcs, out, chunk_size=CHUNK, progress_bar=False, resume=True)
    _same_dataset(tmp_path / "ref", out)


def test_workers_read_decoded_chunks_whole_and_larger_chunks_in_bounded_pieces(tmp_path):
    """A worker reading Zarr or gzip h5ad gains nothing from pieces smaller than its chunk (each boundary
    decodes a partly read storage chunk), but a large --chunk-size must not make it read more than
    WORKER_PIECE_CELLS cells at once; memory-mapped (uncompressed) h5ad keeps small pieces."""
    import inspect

    from scfm_fast.readers import open_reader

    default = inspect.signature(tokenize_corpus).parameters["chunk_size"].default
    assert _pieces.piece_size(default, whole=True) == default
    assert _pieces.piece_size(default) == _pieces.PIECE_CELLS < default
    assert _pieces.piece_size(10 * default, whole=True) == _pieces.WORKER_PIECE_CELLS
    assert _pieces.piece_size(30, whole=True) == 30
    a = ad.AnnData(sp.csr_matrix(np.ones((3, 2), dtype=np.float32)))
    a.write_zarr(tmp_path / "a.zarr")
    a.write_h5ad(tmp_path / "a.h5ad")
    a.write_h5ad(tmp_path / "gz.h5ad", compression="gzip")
    with open_reader(tmp_path / "a.zarr") as z, open_reader(tmp_path / "a.h5ad") as h, \
            open_reader(tmp_path / "gz.h5ad") as g:
        assert z.decodes_chunks and g.decodes_chunks and not h.decodes_chunks
