"""GeneCompass value tokenization of CSR chunks, dispatched like :mod:`scfm_fast.tokenizer.rank`.

GeneCompass orders a cell's genes by ``count / median`` (highest first) exactly as Geneformer's rank
key does, so the token ids come from :func:`~scfm_fast.tokenizer.rank.tokenize_rank` (budget =
``max_len``, no special tokens) on the chosen backend; a second O(nnz) pass on the same backend
computes each kept token's float32 value.  Every backend is bit-identical to the oracle
:func:`scfm_fast.tokenizer.reference.value_tokenize_ref`, whose docstring defines the semantics.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _ext
from . import rank
from .reference import check_counts_ref, value_tokenize_ref

__all__ = ["tokenize_values"]


def _normalize_total(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        msg = f"normalize_total must be a positive number or None, got {value!r}"
        raise TypeError(msg)
    if not (math.isfinite(float(value)) and float(value) > 0):
        msg = f"normalize_total must be a positive finite number (e.g. 10000) or None, got {value!r}"
        raise ValueError(msg)
    return float(value)


def tokenize_values(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    *,
    col_token: np.ndarray,
    token_median: np.ndarray,
    max_len: int = 2048,
    normalize_total: float | None = None,
    totals: np.ndarray | None = None,
    allow_non_integer: bool = False,
    backend: str = "auto",
    n_threads: int | None = None,
    sums: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize a CSR chunk by GeneCompass's rule: token ids and their values, same order.

    Parameters
    ----------
    indptr, indices, data
        CSR arrays of the chunk (as for :func:`~scfm_fast.tokenizer.rank.tokenize_rank`).
    col_token
        Token id per source column (int32), negative for genes outside the vocabulary.
    token_median
        float64 gene median per token id.
    max_len
        Genes kept per cell (GeneCompass: 2,048; it has no special tokens).
    normalize_total
        ``None`` (GeneCompass's released corpus: value = log2(1 + count / median)), or a target
        such as 10,000 for the variant with a library-size step (count / total x target / median).
    totals
        Per-cell totals for ``normalize_total``; each row's sequential sum when ``None``.
    allow_non_integer
        Accept fractional counts.
    backend
        ``"auto"``, ``"cpp"``, ``"numba"`` or ``"reference"``, as in ``tokenize_rank``.
    n_threads
        Threads for the chunk (``None``: see ``tokenize_rank``).
    sums
        Optional float64 array of 3 for the chunk's count sums, as in ``tokenize_rank``.

    Returns
    -------
    tokens
        int32 concatenated token ids, each cell's genes by value, highest first, ties by id.
    values
        float32 value of each token.
    offsets
        int64, ``n_cells + 1``.
    totals
        float64 total of each cell.

    Raises
    ------
    CountDataError, ValueError, BackendUnavailableError
        As ``tokenize_rank``; ``ValueError`` / ``TypeError`` also for a bad ``normalize_total``.
    """
    target = _normalize_total(normalize_total)
    name = rank._pick_backend(backend)
    indptr, indices, data, col_token, token_median, totals, max_len, _, _ = rank._prepare(
        indptr, indices, data, col_token, token_median, totals, max_len, -1, -1
    )
    if name == "reference":
        if sums is not None:
            sums[:] = 0.0  # the count sums are left to the caller (tokenize_rank sets them on the other paths)
        # the dispatcher's own checks first, so errors read the same on every backend
        check_counts_ref(indptr, data, allow_non_integer=bool(allow_non_integer))
        rank._check_indices(indptr, indices, col_token.shape[0])
        return value_tokenize_ref(indptr, indices, data, col_token=col_token, token_median=token_median,
                                  max_len=max_len, normalize_total=target, totals=totals,
                                  allow_non_integer=allow_non_integer)
    tokens, offsets, cell_totals = rank.tokenize_rank(
        indptr, indices, data, col_token=col_token, token_median=token_median, max_len=max_len,
        totals=totals, allow_non_integer=allow_non_integer, backend=name, n_threads=n_threads, sums=sums,
    )
    factor = None
    if target is not None:
        with np.errstate(divide="ignore", invalid="ignore"):  # cells without a positive total have no tokens
            factor = target / cell_totals
    threads = _ext.resolve_n_threads(n_threads)
    if name == "cpp":
        values = _ext.core.token_values(indptr, indices, data, col_token, token_median, tokens, offsets,
                                        factor, threads)
    else:
        from ._numba_values import token_values_numba

        values = token_values_numba(indptr.astype(np.int64, copy=False), indices, data, col_token, token_median,
                                    tokens, offsets, factor, threads)
    return tokens, values, offsets, cell_totals
