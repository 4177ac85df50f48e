"""Streaming histogram medians vs the exact NumPy medians, on real data and edge cases."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse as sp

from scfm_fast.tokenizer.medians import MedianAccumulator, gene_medians_ref, write_gene_dictionaries


def _run(acc, m, totals, col_gene, chunk=37):
    for s in range(0, m.shape[0], chunk):
        b = m[s:s + chunk]
        acc.add(b.indptr, b.indices, b.data, totals[s:s + chunk], col_gene)


@pytest.mark.parametrize("bpo", [16, 64])
def test_histogram_medians_within_bound_on_real_data(pbmc_path, bpo):
    ad = pytest.importorskip("anndata")
    a = ad.read_h5ad(pbmc_path)
    m = sp.csr_matrix(np.asarray(a.X, dtype=np.float32))
    totals = a.obs["n_counts"].to_numpy(np.float64)
    genes = list(a.var_names)
    acc = MedianAccumulator(genes, bins_per_octave=bpo)
    col_gene = acc.col_gene(genes)
    _run(acc, m, totals, col_gene)
    got, n = acc.medians()
    exact = gene_medians_ref(m.indptr, m.indices, m.data, totals, col_gene, len(genes))
    expressed = np.isfinite(exact)
    assert set(got) == {g for g, e in zip(genes, expressed) if e}
    rel = np.array([abs(got[g] / exact[i] - 1) for i, g in enumerate(genes) if expressed[i]])
    assert rel.max() <= acc.relative_error_bound
    assert np.median(rel) < acc.relative_error_bound / 4  # interpolation does much better than the bound
    np.testing.assert_array_equal(n, np.asarray((m > 0).sum(0)).ravel())


def test_duplicates_summed_zero_cells_and_clamping():
    # gene "A" appears in two columns: summed per cell before normalising
    X = np.array([[1, 1, 2], [0, 0, 0], [4, 0, 4], [1e9, 0, 1]], dtype=np.float64)
    m = sp.csr_matrix(X)
    totals = np.array([4.0, 0.0, 8.0, 1e9 + 1])
    acc = MedianAccumulator(["A", "B"], bins_per_octave=256)
    col_gene = acc.col_gene(["A", "A", "B"])
    acc.add(m.indptr, m.indices, m.data, totals, col_gene)
    med, n = acc.medians()
    exact = gene_medians_ref(m.indptr, m.indices, m.data, totals, col_gene, 2)
    assert n.tolist() == [3, 3]
    assert med["A"] == pytest.approx(exact[0], rel=acc.relative_error_bound)
    assert acc.n_clamped[0] == 1  # 1 / 1e9 * 1e4 = 1e-5 is below the default range


def test_write_dictionaries_geneformer_format(tmp_path):
    paths = write_gene_dictionaries({"G2": 2.5, "G1": 1.0}, tmp_path, special_tokens=["<pad>", "<mask>", "<cls>"])
    tok = pickle.loads(paths["token_dictionary"].read_bytes())
    med = pickle.loads(paths["gene_median"].read_bytes())
    assert tok == {"<pad>": 0, "<mask>": 1, "<cls>": 2, "G1": 3, "G2": 4}
    assert med == {"G1": 1.0, "G2": 2.5}
