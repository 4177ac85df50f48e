"""The reference tokenizer against Geneformer's published formula, on real PBMC data.

Geneformer: value = count / n_counts x 10,000 / median over dictionary genes, zeros dropped, genes
ordered by value descending, truncated to 2,048. Its own tie order is numpy's unstable argsort, so
the comparison allows any permutation *within* a group of equal values, and checks our documented
tie order (token id ascending) separately.
"""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast.tokenizer.reference import rank_tokenize_ref
from scfm_fast.vocab import GeneVocab, load_gene_name_map, resolve_genes


def _published_formula(x_row, n_counts, col_token, token_median, max_len):
    """Geneformer's steps for one dense cell, in float64, untied order left free."""
    genes = np.flatnonzero((col_token >= 0) & (x_row > 0))
    vals = x_row[genes].astype(np.float64) / n_counts * 10_000 / token_median[col_token[genes]]
    order = np.argsort(-vals, kind="stable")
    return col_token[genes][order][:max_len], vals[order][:max_len]


@pytest.fixture(scope="module")
def pbmc(pbmc_path):
    ad = pytest.importorskip("anndata")
    a = ad.read_h5ad(pbmc_path)
    vocab = GeneVocab.load()
    col, _ = resolve_genes(a.var_names, vocab, gene_name_map=load_gene_name_map())
    return a, vocab, col


@pytest.mark.parametrize("max_len", [2048, 300, 1])
def test_reference_equals_published_formula_up_to_ties(pbmc, max_len):
    import scipy.sparse as sp

    a, vocab, col = pbmc
    X = np.asarray(a.X, dtype=np.float32)
    n_counts = a.obs["n_counts"].to_numpy(np.float64)
    m = sp.csr_matrix(X)
    toks, offs, totals = rank_tokenize_ref(m.indptr, m.indices, m.data, col_token=col,
                                           token_median=vocab.token_median, max_len=max_len, totals=n_counts)
    np.testing.assert_array_equal(totals, n_counts)
    for i in range(a.n_obs):
        ours = toks[offs[i]:offs[i + 1]]
        theirs, vals = _published_formula(X[i], n_counts[i], col, vocab.token_median, max_len)
        assert ours.size == theirs.size
        # same multiset of values at every rank; identical tokens wherever values are unique
        pos = {t: k for k, t in enumerate(theirs)}
        ranks_ours = np.array([pos.get(t, -1) for t in ours])
        if max_len >= 2048:
            assert (ranks_ours >= 0).all()
        uniq = np.r_[vals[1:] != vals[:-1], True] & np.r_[True, vals[1:] != vals[:-1]]
        np.testing.assert_array_equal(ours[uniq], theirs[uniq])
        # documented tie order: token id ascending inside each equal-value group
        key = {t: v for t, v in zip(theirs, vals)}
        our_keys = np.array([key[t] for t in ours if t in key])
        assert (np.diff(our_keys) <= 0).all()
        for k in range(1, len(ours)):
            if ours[k] in key and ours[k - 1] in key and key[ours[k]] == key[ours[k - 1]]:
                assert ours[k] > ours[k - 1]


def test_ties_are_ordered_by_token_id():
    # four genes with equal count/median, one larger: the larger first, then ties by token id
    indptr, indices = np.array([0, 5]), np.array([0, 1, 2, 3, 4])
    data = np.array([2.0, 2.0, 4.0, 2.0, 9.0])
    col_token = np.array([7, 3, 9, 5, 4], dtype=np.int32)
    med = np.ones(10)
    med[9] = 2.0  # 4 / 2 == 2 / 1: a tie across different medians
    toks, _, _ = rank_tokenize_ref(indptr, indices, data, col_token=col_token, token_median=med, max_len=10)
    assert toks.tolist() == [4, 3, 5, 7, 9]
    toks, _, _ = rank_tokenize_ref(indptr, indices, data, col_token=col_token, token_median=med, max_len=3)
    assert toks.tolist() == [4, 3, 5]  # truncation cuts inside the tie group deterministically


def test_cls_eos_and_truncation_layout(pbmc):
    import scipy.sparse as sp

    a, vocab, col = pbmc
    m = sp.csr_matrix(np.asarray(a.X[:20], dtype=np.float32))
    v1, o1, _ = rank_tokenize_ref(m.indptr, m.indices, m.data, col_token=col,
                                  token_median=vocab.token_median, max_len=100)
    v2, o2, _ = rank_tokenize_ref(m.indptr, m.indices, m.data, col_token=col,
                                  token_median=vocab.token_median, max_len=100, cls_token=25_426,
                                  eos_token=25_427)
    for i in range(20):
        c1, c2 = v1[o1[i]:o1[i + 1]], v2[o2[i]:o2[i + 1]]
        assert c1.size == 100 and c2.size == 100  # all these cells express > 100 genes
        assert c2[0] == 25_426 and c2[-1] == 25_427
        np.testing.assert_array_equal(c2[1:-1], c1[:98])  # specials counted inside max_len
