"""tokenize_corpus end to end: every source format, every backend, equal to the in-memory reference."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from scfm_fast._errors import CountDataError, GeneMatchError, InputFileError, UsageError
from scfm_fast.store import TokenStore, read_manifest, read_table, to_hf_dataset
from scfm_fast.store.schema import base_schema
from scfm_fast.tokenizer.pipeline import tokenize_anndata, tokenize_corpus
from scfm_fast.tokenizer.rank import available_backends
from scfm_fast.tokenizer.reference import rank_tokenize_ref
from scfm_fast.vocab import GeneVocab, resolve_genes
from tests._data import make_counts_adata

ad = pytest.importorskip("anndata")
BACKENDS = [b for b, why in available_backends().items() if why is None]


@pytest.fixture(scope="module")
def vocab():
    return GeneVocab.load()


@pytest.fixture(scope="module")
def adata(vocab):
    return make_counts_adata(vocab, n_cells=45, n_genes=70)


def _expected(adata, vocab, max_len=2048):
    col, _ = resolve_genes(adata.var_names, vocab)
    m = sp.csr_matrix(adata.X)
    toks, offs, _ = rank_tokenize_ref(m.indptr, m.indices, m.data, col_token=col,
                                      token_median=vocab.token_median, max_len=max_len)
    return [toks[offs[i]:offs[i + 1]] for i in range(adata.n_obs)]


def _write(adata, path, fmt):
    if fmt == "h5ad":
        adata.write_h5ad(path)
    elif fmt == "h5ad-dense":
        b = adata.copy()
        b.X = np.asarray(b.X.todense())
        b.write_h5ad(path)
    elif fmt == "zarr":
        adata.write_zarr(path)
    elif fmt == "loom":
        pytest.importorskip("loompy")
        b = adata.copy()
        b.obs["cell_type"] = b.obs["cell_type"].astype(str)
        b.write_loom(path)
    return path


@pytest.mark.parametrize("fmt,suffix", [("h5ad", ".h5ad"), ("h5ad-dense", ".h5ad"), ("zarr", ".zarr"),
                                        ("loom", ".loom")])
def test_all_formats_give_reference_tokens(tmp_path, adata, vocab, fmt, suffix):
    src = _write(adata, tmp_path / f"cells{suffix}", fmt)
    man = tokenize_corpus(src, tmp_path / "out", chunk_size=16, obs_columns=["batch"], progress_bar=False)
    want = _expected(adata, vocab)
    tab = read_table(tmp_path / "out")
    kept = [i for i, w in enumerate(want) if w.size]
    assert tab.column("cell_index").to_pylist() == kept
    for got, i in zip(tab.column("input_ids").to_pylist(), kept):
        assert got == want[i].tolist()
    assert tab.column("batch").to_pylist() == adata.obs["batch"].iloc[kept].tolist()
    assert tab.column("cell_id").to_pylist() == adata.obs_names[kept].tolist()
    assert man["summary"]["n_empty"] == 1 and man["n_cells"] == len(kept)
    store = TokenStore(tmp_path / "out")
    for k, i in enumerate(kept):
        np.testing.assert_array_equal(store[k], want[i])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_identical_on_real_pbmc(tmp_path, pbmc_path, backend):
    src = pbmc_path
    tokenize_corpus(src, tmp_path / "o", backend=backend, chunk_size=64, progress_bar=False)
    a = ad.read_h5ad(src)
    got = read_table(tmp_path / "o").column("input_ids").to_pylist()
    want = tokenize_anndata(a, backend="reference").column("input_ids").to_pylist()
    assert got == want
    assert len(got) == 200


@pytest.mark.parametrize("backend", BACKENDS)
def test_mouse_zarr_with_orthologs(tmp_path, shared_dir, backend):
    src = shared_dir / "data/mouse/scanpy_10x-10k-subset.zarr"
    man = tokenize_corpus(src, tmp_path / "o", orthologs="mouse-to-human", gene_id_column="gene_ids",
                          chunk_size=3000, backend=backend, progress_bar=False)
    assert man["gene_match"][0]["n_by_ortholog"] > 500
    store = TokenStore(tmp_path / "o")
    assert len(store) + man["summary"]["n_empty"] == 10_000
    # spot-check against the reference on the in-memory matrix
    import zarr

    X = zarr.open_group(str(src), mode="r")["X"][:500]
    vocab = GeneVocab.load()
    from scfm_fast.vocab import load_ortholog_map

    var = zarr.open_group(str(src), mode="r")["var"][:]
    col, _ = resolve_genes([g.decode() for g in var["gene_ids"]], vocab, ortholog_map=load_ortholog_map())
    m = sp.csr_matrix(X)
    toks, offs, _ = rank_tokenize_ref(m.indptr, m.indices, m.data, col_token=col,
                                      token_median=vocab.token_median, max_len=2048)
    nonempty = [toks[offs[i]:offs[i + 1]] for i in range(500) if offs[i + 1] > offs[i]]
    for k, w in enumerate(nonempty):
        np.testing.assert_array_equal(store[k], w)


def test_n_counts_and_filter_pass(tmp_path, adata, vocab):
    b = adata.copy()
    b.obs["n_counts"] = np.asarray(b.X.sum(1)).ravel() * 2.0  # totals over more genes than stored
    b.obs.loc[b.obs_names[[0, 7]], "filter_pass"] = 0
    b.write_h5ad(tmp_path / "c.h5ad")
    man = tokenize_corpus(tmp_path / "c.h5ad", tmp_path / "o", progress_bar=False)
    assert man["summary"]["n_filtered"] == 2
    tab = read_table(tmp_path / "o")
    assert 0 not in tab.column("cell_index").to_pylist() and 7 not in tab.column("cell_index").to_pylist()
    want = _expected(adata, vocab)  # scaling totals never changes the ranking
    assert tab.column("cell_index").to_pylist() == [i for i, w in enumerate(want) if w.size and i not in (0, 7)]
    for got, i in zip(tab.column("input_ids").to_pylist(), tab.column("cell_index").to_pylist()):
        assert got == want[i].tolist()


def test_resume_after_interruption(tmp_path, adata, vocab, monkeypatch):
    src = _write(adata, tmp_path / "c.h5ad", "h5ad")
    from scfm_fast.store import writer as writer_mod

    real = writer_mod.ShardedTokenWriter.write_shard
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while writing the third shard
        return real(self, *a, **k)

    monkeypatch.setattr(writer_mod.ShardedTokenWriter, "write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(src, tmp_path / "o", chunk_size=10, progress_bar=False)
    monkeypatch.setattr(writer_mod.ShardedTokenWriter, "write_shard", real)
    assert json.loads((tmp_path / "o/__scfm__/manifest.json").read_text())["status"] == "in_progress"
    with pytest.raises(Exception, match="--resume"):
        tokenize_corpus(src, tmp_path / "o", chunk_size=10, progress_bar=False)
    with pytest.raises(Exception, match="different inputs or options"):
        tokenize_corpus(src, tmp_path / "o", chunk_size=12, resume=True, progress_bar=False)
    man = tokenize_corpus(src, tmp_path / "o", chunk_size=10, resume=True, progress_bar=False)
    assert len(man["shards"]) == 5
    ids = read_table(tmp_path / "o").column("cell_index").to_pylist()
    assert ids == sorted(set(ids)) and len(ids) == adata.n_obs - 1  # no duplicates, none missing


@pytest.mark.parametrize("bad,match", [(np.nan, "NaN"), (-1.0, "negative"), (2.5, "not a raw count")])
def test_bad_counts_name_file_cell_and_gene(tmp_path, adata, bad, match):
    b = adata.copy()
    X = np.asarray(b.X.todense())
    X[9, 4] = bad
    b.X = sp.csr_matrix(X)
    b.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(CountDataError) as e:
        tokenize_corpus(tmp_path / "bad.h5ad", tmp_path / "o", progress_bar=False)
    msg = str(e.value)
    assert "bad.h5ad" in msg and "cell9" in msg and b.var_names[4] in msg
    assert re.search(match, msg, re.IGNORECASE), msg
    assert read_manifest(tmp_path / "o", require_complete=False)["status"] == "in_progress"
    if bad == 2.5:
        man = tokenize_corpus(tmp_path / "bad.h5ad", tmp_path / "o2", allow_non_integer=True,
                              progress_bar=False)
        assert man["status"] == "complete"


def test_bad_n_counts(tmp_path, adata):
    b = adata.copy()
    b.obs["n_counts"] = 1.0
    b.obs.loc["cell2", "n_counts"] = -5
    b.write_h5ad(tmp_path / "c.h5ad")
    with pytest.raises(CountDataError, match="cell2.*n_counts"):
        tokenize_corpus(tmp_path / "c.h5ad", tmp_path / "o", progress_bar=False)


def test_input_errors(tmp_path, adata):
    with pytest.raises(InputFileError, match="missing.h5ad"):
        tokenize_corpus(tmp_path / "missing.h5ad", tmp_path / "o", progress_bar=False)
    adata.write_h5ad(tmp_path / "c.h5ad")
    with pytest.raises(InputFileError, match="nope.*available"):
        tokenize_corpus(tmp_path / "c.h5ad", tmp_path / "o", obs_columns=["nope"], progress_bar=False)
    with pytest.raises(InputFileError, match="gene_ids"):
        tokenize_corpus(tmp_path / "c.h5ad", tmp_path / "o", gene_id_column="gene_ids", progress_bar=False)
    junk = adata.copy()
    junk.var_names = [f"junk{i}" for i in range(junk.n_vars)]
    junk.write_h5ad(tmp_path / "junk.h5ad")
    with pytest.raises(GeneMatchError, match="junk.h5ad"):
        tokenize_corpus(tmp_path / "junk.h5ad", tmp_path / "o", progress_bar=False)


def test_v2_layout_with_custom_dictionary(tmp_path, adata, vocab):
    import pickle

    tok = dict(vocab.token_of)
    tok["<cls>"], tok["<eos>"] = vocab.size, vocab.size + 1
    (tmp_path / "tok.pkl").write_bytes(pickle.dumps(tok))
    adata.write_h5ad(tmp_path / "c.h5ad")
    tokenize_corpus(tmp_path / "c.h5ad", tmp_path / "o", preset="geneformer-v2", max_len=12,
                    token_dictionary=tmp_path / "tok.pkl", gene_median=vocab.gene_median_path,
                    progress_bar=False)
    want = _expected(adata, vocab, max_len=10)
    tab = read_table(tmp_path / "o")
    assert tab.column("cell_index").to_pylist() == [i for i, w in enumerate(want) if w.size]
    for got, i in zip(tab.column("input_ids").to_pylist(), tab.column("cell_index").to_pylist()):
        assert got == [vocab.size, *want[i].tolist(), vocab.size + 1]
        assert len(got) <= 12


def test_two_inputs_and_ecosystem_readers(tmp_path, adata, vocab):
    import pyarrow.dataset as pds

    a1, a2 = adata[:20].copy(), adata[20:].copy()
    a1.write_h5ad(tmp_path / "a1.h5ad")
    a2.write_zarr(tmp_path / "a2.zarr")
    man = tokenize_corpus([tmp_path / "a1.h5ad", tmp_path / "a2.zarr"], tmp_path / "o", chunk_size=8,
                          obs_columns=["cell_type"], progress_bar=False)
    assert man["inputs"] == [str(tmp_path / "a1.h5ad"), str(tmp_path / "a2.zarr")]
    want = _expected(adata, vocab)
    tab = read_table(tmp_path / "o")
    rows = [(f, c) for f, c in zip(tab.column("file_index").to_pylist(), tab.column("cell_index").to_pylist())]
    assert rows == sorted(rows)
    assert [c + 20 * f for f, c in rows] == [i for i, w in enumerate(want) if w.size]
    for got, (f, c) in zip(tab.column("input_ids").to_pylist(), rows):
        assert got == want[c + 20 * f].tolist()
    # the directory is a plain Parquet dataset for pyarrow and Hugging Face datasets
    assert pds.dataset(str(tmp_path / "o"), format="parquet").count_rows() == tab.num_rows
    datasets = pytest.importorskip("datasets")
    hf = datasets.load_dataset("parquet", data_dir=str(tmp_path / "o"), split="train")
    assert hf.num_rows == tab.num_rows and set(hf.column_names) >= {"input_ids", "length", "cell_type"}
    assert sorted(map(tuple, hf["input_ids"])) == sorted(map(tuple, tab.column("input_ids").to_pylist()))
    # our helper: the same shards in shard order
    ours = to_hf_dataset(tmp_path / "o")
    assert ours["input_ids"] == tab.column("input_ids").to_pylist() and ours["cell_type"] == tab.column(
        "cell_type").to_pylist()
    # the documented shard schema: base columns first, then the requested obs columns
    base = base_schema()
    assert tab.schema.names[:len(base)] == base.names and tab.schema.names[len(base):] == ["cell_type"]
    for f in base:
        assert tab.schema.field(f.name).type == f.type, f.name


def test_obs_columns_with_missing_values_have_one_type_in_every_shard(tmp_path, adata):
    import pandas as pd
    import pyarrow.dataset as pds

    b = adata.copy()
    label = pd.Series(["x", "y"] * (b.n_obs // 2) + ["x"] * (b.n_obs % 2), index=b.obs_names, dtype=object)
    label.iloc[:10] = np.nan  # the whole first shard is missing: it must not become Arrow's null type
    b.obs["label"] = pd.Categorical(label)
    b.obs["note"] = label.astype(object)
    b.write_h5ad(tmp_path / "c.h5ad")
    tokenize_corpus(tmp_path / "c.h5ad", tmp_path / "o", chunk_size=10, obs_columns=["label", "note"],
                    progress_bar=False)
    tab = pds.dataset(str(tmp_path / "o"), format="parquet").to_table()
    rows = tab.column("cell_index").to_pylist()
    want = [None if pd.isna(v) else v for v in label.iloc[rows]]
    assert tab.schema.field("label").type == tab.schema.field("note").type == pa.string()
    assert tab.column("label").to_pylist() == tab.column("note").to_pylist() == want


@pytest.mark.parametrize("kw,match", [
    ({"max_len": 0}, "--max-len 0"), ({"chunk_size": 0}, "--chunk-size"), ({"n_threads": 0}, "--workers"),
    ({"obs_columns": ["length"]}, "'length'.*own columns")])
def test_bad_options_are_refused_before_any_output(tmp_path, adata, kw, match):
    adata.write_h5ad(tmp_path / "c.h5ad")
    with pytest.raises(UsageError, match=match):
        tokenize_corpus(tmp_path / "c.h5ad", tmp_path / "o", progress_bar=False, **kw)
    assert not (tmp_path / "o").exists()


def test_the_same_input_twice_is_refused(tmp_path, adata):
    adata.write_h5ad(tmp_path / "c.h5ad")
    with pytest.raises(UsageError, match="given twice"):
        tokenize_corpus([tmp_path / "c.h5ad", f"{tmp_path}/./c.h5ad"], tmp_path / "o", progress_bar=False)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_resume_refuses_an_input_changed_in_place(tmp_path, adata, fmt):
    import os

    src = _write(adata, tmp_path / f"c.{fmt}", fmt)
    tokenize_corpus(src, tmp_path / "o", chunk_size=10, progress_bar=False)
    # same path, same size, rewritten: only the modification time tells
    b = adata.copy()
    b.X = b.X.copy()
    b.X.data[:] = b.X.data[::-1]
    src2 = _write(b, tmp_path / f"c.{fmt}", fmt)
    assert src2 == src
    if fmt == "h5ad":
        os.utime(src, ns=(1, 2_000_000_000_000_000_000))
    with pytest.raises(Exception, match="input_fingerprints"):
        tokenize_corpus(src, tmp_path / "o", chunk_size=10, resume=True, progress_bar=False)
