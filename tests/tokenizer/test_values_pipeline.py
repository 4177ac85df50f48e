"""GeneCompass tokens end to end: tokenize_corpus / CLI with --preset genecompass writes values and
species that equal the oracle on the same cells, packed values equal the Parquet column, QC counts
reach the manifest."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scfm_fast._errors import UsageError
from scfm_fast.store import TokenStore, read_manifest, read_table
from scfm_fast.tokenizer.pipeline import tokenize_corpus
from scfm_fast.tokenizer.qc import matrix_qc
from scfm_fast.tokenizer.reference import value_tokenize_ref
from scfm_fast.vocab import GeneVocab, load_gene_name_map, resolve_genes
from tests._genecompass import human_mouse_inputs, joint_dictionaries

anndata = pytest.importorskip("anndata")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, pbmc_path):
    tmp = tmp_path_factory.mktemp("gc")
    hp, mp, human_ids, mouse_ids = human_mouse_inputs(tmp, pbmc_path)
    tok, med = joint_dictionaries(tmp, human_ids, mouse_ids)
    return tmp, hp, mp, tok, med


def _oracle(path, tok, med, *, normalize_total=None, species=None):
    adata = anndata.read_h5ad(path)
    vocab = GeneVocab.load(token_dictionary=tok, gene_median=med, preset="genecompass")
    # a file of one declared species resolves symbols in that species' table (PBMC "TTC37" is never mouse Ttc37)
    table = f"ensembl-{species}" if species else "ensembl-human+mouse"
    col_token, _ = resolve_genes(list(adata.var_names), vocab, gene_name_map=load_gene_name_map(table))
    X = sp.csr_matrix(adata.X)
    # the pipeline takes obs["n_counts"] as the cell total when present, as for Geneformer
    totals = adata.obs["n_counts"].to_numpy(np.float64) if "n_counts" in adata.obs else None
    return X, adata, value_tokenize_ref(X.indptr, X.indices, X.data, col_token=col_token,
                                        token_median=vocab.token_median, max_len=2048,
                                        normalize_total=normalize_total, totals=totals)


def _check_against_oracle(out, file_index, oracle, kept_rows):
    tokens, values, offsets, _ = oracle
    tab = read_table(out)
    tab = tab.filter(np.asarray(tab.column("file_index").to_numpy() == file_index))
    assert tab.column("cell_index").to_pylist() == kept_rows
    ids, vals = tab.column("input_ids").to_pylist(), tab.column("values").to_pylist()
    for row, got_ids, got_vals in zip(kept_rows, ids, vals):
        lo, hi = offsets[row], offsets[row + 1]
        assert got_ids == tokens[lo:hi].tolist()
        np.testing.assert_array_equal(np.float32(got_vals), values[lo:hi])
    return tab


def test_two_species_from_obs_column(inputs):
    tmp, hp, mp, tok, med = inputs
    out = tmp / "both"
    man = tokenize_corpus([hp, mp], out, preset="genecompass", token_dictionary=tok, gene_median=med,
                          species_column="organism", progress_bar=False, chunk_size=70)
    assert man["config"]["values"] and man["config"]["species_column"] == "organism"
    assert man["packed"]["optional"] == ["values", "species"]
    for fi, path in enumerate([hp, mp]):
        X, _, oracle = _oracle(path, tok, med)
        kept = np.flatnonzero(np.diff(oracle[2]) > 0).tolist()
        tab = _check_against_oracle(out, fi, oracle, kept)
        assert set(tab.column("species").to_pylist()) == {fi}  # human 0, mouse 1
    # the packed store: values aligned with tokens, species per cell, both equal to the shards
    store, tab = TokenStore(out), read_table(out)
    assert store.values.dtype == np.float32 and store.values.shape == store.tokens.shape
    for i in range(len(store)):
        np.testing.assert_array_equal(store.cell_values(i), np.float32(tab.column("values")[i].as_py()))
        assert store[i].tolist() == tab.column("input_ids")[i].as_py()
    np.testing.assert_array_equal(store.species, tab.column("species").to_numpy())
    # the shared cell-token source reads them too, from the directory and from tokenize_anndata's table
    from scfm_fast.store import open_cells

    cells = open_cells(out)
    idx = np.arange(len(store))
    assert cells.has_values
    for got, i in zip(cells.take_values(idx), idx):
        np.testing.assert_array_equal(got, store.cell_values(i))
    np.testing.assert_array_equal(cells.species, store.species)


def test_cli_species_normalize_total_and_qc(inputs, capsys):
    from scfm_fast.cli import main

    tmp, hp, _, tok, med = inputs
    out = tmp / "cli"
    rc = main(["tokenize", str(hp), "--out", str(out), "--preset", "genecompass", "--token-dictionary", str(tok),
               "--gene-median", str(med), "--species", "human", "--normalize-total", "--qc", "genecompass"])
    assert rc == 0
    man = read_manifest(out)
    assert man["config"]["normalize_total"] == 10000 and man["config"]["species"] == "human"
    X, adata, oracle = _oracle(hp, tok, med, normalize_total=10000, species="human")
    keep, report = matrix_qc(X, list(adata.var_names))
    assert report.n_dropped > 0  # the PBMC file has outliers
    assert man["qc"]["files"] == [report.to_dict()] and man["summary"]["n_qc_dropped"] == report.n_dropped
    kept = np.flatnonzero((np.diff(oracle[2]) > 0) & keep).tolist()
    tab = _check_against_oracle(out, 0, oracle, kept)
    assert set(tab.column("species").to_pylist()) == {0}
    assert "cells dropped" in capsys.readouterr().err


def test_species_options_are_checked(inputs):
    tmp, hp, _, tok, med = inputs
    kw = dict(token_dictionary=tok, gene_median=med, progress_bar=False)
    with pytest.raises(UsageError, match="exactly one"):
        tokenize_corpus(hp, tmp / "x", preset="genecompass", **kw)
    with pytest.raises(UsageError, match="only apply to --preset genecompass"):
        tokenize_corpus(hp, tmp / "x", species="human", progress_bar=False)
    with pytest.raises(UsageError, match="--qc"):
        tokenize_corpus(hp, tmp / "x", preset="genecompass", species="human", qc="scanpy", **kw)
    with pytest.raises(Exception, match="organism2"):
        tokenize_corpus(hp, tmp / "x", preset="genecompass", species_column="organism2", **kw)


def test_tokenize_anndata_equals_corpus_and_resume_keeps_values(inputs, monkeypatch):
    from scfm_fast import tokenize_anndata
    from scfm_fast.store import writer as writer_mod

    tmp, _, mp, tok, med = inputs
    kw = dict(preset="genecompass", token_dictionary=tok, gene_median=med, species="mouse", qc="genecompass",
              chunk_size=16, progress_bar=False)
    whole = tmp / "mouse"
    tokenize_corpus(mp, whole, **kw)
    corpus = read_table(whole)
    mem = tokenize_anndata(anndata.read_h5ad(mp), preset="genecompass", token_dictionary=tok, gene_median=med,
                           species="mouse", qc="genecompass")
    assert mem.column_names == ["input_ids", "length", "cell_index", "values", "species"]
    for c in ("input_ids", "values", "species", "cell_index"):
        assert mem.column(c).to_pylist() == corpus.column(c).to_pylist()
    from scfm_fast.store import open_cells

    from_table = open_cells(mem).take_values(np.arange(mem.num_rows))
    assert [v.tolist() for v in from_table] == [np.float32(v).tolist() for v in corpus.column("values").to_pylist()]
    # killed while writing the third shard, then resumed: the same values, packed and in the shards
    real = writer_mod.ShardedTokenWriter.write_shard
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(writer_mod.ShardedTokenWriter, "write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(mp, tmp / "resumed", **kw)
    monkeypatch.setattr(writer_mod.ShardedTokenWriter, "write_shard", real)
    tokenize_corpus(mp, tmp / "resumed", resume=True, **kw)
    resumed = read_table(tmp / "resumed")
    for c in ("input_ids", "values", "species", "cell_index"):
        assert resumed.column(c).to_pylist() == corpus.column(c).to_pylist()
    np.testing.assert_array_equal(TokenStore(tmp / "resumed").values, TokenStore(whole).values)
    np.testing.assert_array_equal(TokenStore(tmp / "resumed").species, TokenStore(whole).species)


def test_values_and_keep_counts_together(inputs):
    from scfm_fast import tokenize_anndata

    tmp, hp, _, tok, med = inputs
    out = tmp / "counts"
    tokenize_corpus(hp, out, preset="genecompass", token_dictionary=tok, gene_median=med, species="human",
                    keep_counts=True, progress_bar=False, chunk_size=64)
    X, adata, oracle = _oracle(hp, tok, med, species="human")
    kept = np.flatnonzero(np.diff(oracle[2]) > 0).tolist()
    tab = _check_against_oracle(out, 0, oracle, kept)  # the values are untouched by keep_counts
    # counts by definition: each token's gene count (duplicate columns summed) / cell total x 10,000
    vocab = GeneVocab.load(token_dictionary=tok, gene_median=med, preset="genecompass")
    col_token, _ = resolve_genes(list(adata.var_names), vocab,
                                 gene_name_map=load_gene_name_map("ensembl-human+mouse"))
    dense = X.toarray().astype(np.float64)
    totals = adata.obs["n_counts"].to_numpy(np.float64) if "n_counts" in adata.obs else dense.sum(axis=1)
    for row, ids, got in zip(kept, tab.column("input_ids").to_pylist(), tab.column("counts").to_pylist()):
        want = [dense[row, col_token == t].sum() / totals[row] * 10_000 for t in ids]
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert all(c > 0 for c in got)
    mem = tokenize_anndata(adata, preset="genecompass", token_dictionary=tok, gene_median=med, species="human",
                           keep_counts=True)
    assert mem.column_names == ["input_ids", "length", "cell_index", "values", "species", "counts"]
    for c in ("input_ids", "values", "counts"):
        assert mem.column(c).to_pylist() == tab.column(c).to_pylist()
