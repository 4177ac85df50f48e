"""Streaming histogram medians vs the exact NumPy medians, on real data and edge cases."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse as sp

from scfm_fast._errors import CountDataError, UsageError
from scfm_fast.tokenizer.medians import (
    MedianAccumulator,
    compute_gene_medians,
    gene_medians_ref,
    write_gene_dictionaries,
)


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


def _medians_input(tmp_path, X, **obs):
    ad = pytest.importorskip("anndata")
    import pandas as pd

    a = ad.AnnData(sp.csr_matrix(np.asarray(X, dtype=np.float32)),
                   obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(len(X))]),
                   var=pd.DataFrame(index=[f"G{j}" for j in range(len(X[0]))]))
    a.write_h5ad(tmp_path / "m.h5ad")
    return tmp_path / "m.h5ad"


def test_empty_cells_at_the_end_of_a_chunk(tmp_path):
    # cell totals from the counts: empty rows at a chunk's end once crashed np.add.reduceat
    X = [[2, 0, 1], [0, 4, 4], [0, 0, 0], [6, 2, 0], [0, 0, 0]]
    med, report = compute_gene_medians(_medians_input(tmp_path, X), chunk_size=3, progress_bar=False)
    m = sp.csr_matrix(np.asarray(X, dtype=np.float64))
    exact = gene_medians_ref(m.indptr, m.indices, m.data, np.asarray(m.sum(1)).ravel(), np.arange(3), 3)
    assert report["n_cells"] == 5
    for g, e in zip(["G0", "G1", "G2"], exact):
        assert med[g] == pytest.approx(e, rel=2 ** (1 / 64) - 1)


@pytest.mark.parametrize("value,match", [(-3, "c1.*'G2'.*negative"), (np.nan, "c1.*'G2'.*NaN"),
                                         (0.5, "c1.*'G2'.*--allow-non-integer")])
def test_bad_counts_name_the_cell_and_gene(tmp_path, value, match):
    X = [[2.0, 0, 1], [0, 4, value]]
    path = _medians_input(tmp_path, X)
    with pytest.raises(CountDataError, match=match):
        compute_gene_medians(path, progress_bar=False)
    if value == 0.5:
        med, _ = compute_gene_medians(path, allow_non_integer=True, progress_bar=False)
        assert set(med) == {"G0", "G1", "G2"}


def test_bad_n_counts_and_options(tmp_path):
    path = _medians_input(tmp_path, [[2, 0, 1], [0, 4, 4]], n_counts=[3.0, np.nan])
    with pytest.raises(CountDataError, match="c1.*n_counts"):
        compute_gene_medians(path, progress_bar=False)
    with pytest.raises(UsageError, match="--bins-per-octave"):
        compute_gene_medians(path, bins_per_octave=0, progress_bar=False)
    with pytest.raises(UsageError, match="is a file"):
        write_gene_dictionaries({"G1": 1.0}, path)


def test_cells_that_tokenization_filters_out_do_not_count(tmp_path):
    X = [[2, 0, 1], [0, 4, 4], [9, 9, 9], [6, 2, 0], [1, 1, 1]]
    keep = [1, 1, 0, 1, 0]
    med, report = compute_gene_medians(_medians_input(tmp_path, X, filter_pass=keep), chunk_size=2,
                                       progress_bar=False)
    m = sp.csr_matrix(np.asarray([x for x, k in zip(X, keep) if k], dtype=np.float64))
    exact = gene_medians_ref(m.indptr, m.indices, m.data, np.asarray(m.sum(1)).ravel(), np.arange(3), 3)
    assert report["n_cells"] == 3
    for g, e in zip(["G0", "G1", "G2"], exact):
        assert med[g] == pytest.approx(e, rel=2 ** (1 / 64) - 1)
