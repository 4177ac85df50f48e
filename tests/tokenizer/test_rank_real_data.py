"""Real 10x counts through every backend, Geneformer V1 and V2-like presets: identical to the oracle."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from scfm_fast.tokenizer.rank import available_backends, tokenize_rank
from scfm_fast.tokenizer.reference import rank_tokenize_ref

BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))
    for name, reason in available_backends().items()
]


def _load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def vocab(geneformer_v1_dir):
    """(token dict, median dict, symbol -> Ensembl), and the token_median array."""
    tokens = _load(geneformer_v1_dir / "token_dictionary.pkl")
    medians = _load(geneformer_v1_dir / "gene_median_dictionary.pkl")
    names = _load(geneformer_v1_dir / "gene_name_id_dict.pkl")
    token_median = np.full(max(tokens.values()) + 1, np.nan)
    for gene, tok in tokens.items():
        if gene in medians:
            token_median[tok] = medians[gene]
    return tokens, medians, names, token_median


def _col_token(ensembl_ids, tokens, medians):
    # Geneformer tokenizes only genes that have a median
    return np.array([tokens[g] if g in medians and g in tokens else -1 for g in ensembl_ids], dtype=np.int32)


@pytest.fixture(scope="module")
def pbmc(shared_dir, vocab):
    anndata = pytest.importorskip("anndata")
    path = shared_dir / "data" / "human" / "scvi_pbmc_5k_protein_v3_200cells.h5ad"
    if not path.exists():
        pytest.skip(f"{path} not found")
    adata = anndata.read_h5ad(path)
    tokens, medians, names, token_median = vocab
    col_token = _col_token([names.get(s, "") for s in adata.var_names], tokens, medians)
    X = np.asarray(adata.X)
    rows, cols = np.nonzero(X)  # row-major: a CSR layout
    indptr = np.zeros(X.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=X.shape[0]), out=indptr[1:])
    totals = adata.obs["n_counts"].to_numpy(np.float64)
    return indptr, cols.astype(np.int32), X[rows, cols], col_token, token_median, totals


@pytest.fixture(scope="module")
def chr21(shared_dir, vocab):
    h5py = pytest.importorskip("h5py")
    path = shared_dir / "data" / "human" / "scanpy_10x_v3_chr21_filtered_feature_bc_matrix.h5"
    if not path.exists():
        pytest.skip(f"{path} not found")
    with h5py.File(path, "r") as f:
        m = f["matrix"]  # Cell Ranger v3: genes x cells CSC == cells x genes CSR
        indptr, indices, data = m["indptr"][:], m["indices"][:], m["data"][:]
        ids = [x.decode() for x in m["features"]["id"][:]]
    tokens, medians, _, token_median = vocab
    # chr21 holds a few genes only: stand in for n_counts (the total over *all* genes) with more than
    # the row sum, as a user-supplied total would be
    totals = 3.0 * np.add.reduceat(data.astype(np.float64), indptr[:-1]) + 17.0
    return indptr, indices, data, _col_token(ids, tokens, medians), token_median, totals


def _presets(token_median):
    unused = token_median.shape[0]  # ids past the V1 vocabulary stand in for <cls> / <eos>
    return {"v1": dict(max_len=2048), "v2-like": dict(max_len=4096, cls_token=unused, eos_token=unused + 1)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dataset", ["pbmc", "chr21"])
@pytest.mark.parametrize("preset", ["v1", "v2-like"])
@pytest.mark.parametrize("use_totals", [False, True], ids=["row-sum", "n_counts"])
def test_real_data_identical(request, backend, dataset, preset, use_totals):
    indptr, indices, data, col_token, token_median, totals = request.getfixturevalue(dataset)
    kw = dict(
        col_token=col_token,
        token_median=token_median,
        totals=totals if use_totals else None,
        **_presets(token_median)[preset],
    )
    ref = rank_tokenize_ref(indptr, indices, data, **kw)
    for n_threads in (1, 2):
        out = tokenize_rank(indptr, indices, data, backend=backend, n_threads=n_threads, **kw)
        for got, want in zip(out, ref):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(out[2].view(np.int64), ref[2].view(np.int64))
    assert ref[1][-1] > 0  # the data really produced tokens


def test_pbmc_truncates_at_v1_length(pbmc):
    indptr, indices, data, col_token, token_median, _ = pbmc
    tokens, offsets, _ = tokenize_rank(
        indptr, indices, data, col_token=col_token, token_median=token_median, max_len=256
    )
    lengths = np.diff(offsets)
    assert lengths.max() == 256 and (lengths > 0).all()
    assert all(np.unique(tokens[a:b]).size == b - a for a, b in zip(offsets[:-1], offsets[1:]))
