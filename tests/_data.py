"""Small AnnData builders shared by tokenizer / store / CLI tests (not a reference implementation)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def vocab_genes(vocab, n: int, *, seed: int = 0) -> list[str]:
    """``n`` Ensembl ids that the vocabulary tokenizes, chosen reproducibly."""
    rng = np.random.default_rng(seed)
    genes = sorted(g for g in vocab.median_of if vocab.tokenizable(g) >= 0)
    return [genes[i] for i in rng.choice(len(genes), size=n, replace=False)]


def make_counts_adata(vocab, *, n_cells: int = 40, n_genes: int = 60, seed: int = 0, density: float = 0.3):
    """Integer-count AnnData over vocabulary genes, with an empty cell and obs metadata."""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    X = rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float32)
    X[rng.random(X.shape) > density] = 0
    X[3] = 0  # a cell with no expressed genes
    X[5, :4] = 7  # ties inside one cell
    obs = pd.DataFrame({
        "cell_type": pd.Categorical(rng.choice(["B", "T", "NK"], n_cells)),
        "batch": rng.integers(0, 3, n_cells),
        "filter_pass": np.ones(n_cells, dtype=np.int64),
    }, index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=vocab_genes(vocab, n_genes, seed=seed))
    return ad.AnnData(sp.csr_matrix(X), obs=obs, var=var)
