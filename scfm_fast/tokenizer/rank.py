"""Rank-value (Geneformer) tokenization of CSR chunks, dispatched to the fastest available backend.

Backends, all bit-identical to the oracle
:func:`scfm_fast.tokenizer.reference.rank_tokenize_ref` (whose docstring defines the semantics):

``"cpp"``
    the compiled core (``csrc/rank_tokenize.cpp``), multithreaded with the GIL released;
``"numba"``
    :mod:`scfm_fast.tokenizer._numba`, the same algorithm, used when the core is not built;
``"reference"``
    the NumPy oracle itself (slow; for checking).

``backend="auto"`` takes the first usable one in that order and warns once when it has to skip the
C++ core.  Every backend gets the same argument checks here, so errors are identical across them;
out-of-range column indices are reported as a :class:`ValueError` naming the cell row (the oracle
itself would raise NumPy's ``IndexError`` or silently wrap negative indices).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from .. import _ext
from .._errors import BackendUnavailableError, CountDataError
from .reference import _count_error, check_counts_ref, rank_tokenize_ref

__all__ = ["available_backends", "rank_output_bound", "tokenize_rank"]

BACKENDS = ("cpp", "numba", "reference")
_I32 = np.iinfo(np.int32)

_numba_module: Any = None
_numba_error: str | None = None


def _load_numba() -> Any:
    """Import the Numba kernels once (numba is slow to import); ``None`` when unusable."""
    global _numba_module, _numba_error
    if _numba_module is None and _numba_error is None:
        try:
            from . import _numba as module
        except Exception as exc:  # noqa: BLE001 - any import failure just disables the backend
            _numba_error = f"{type(exc).__name__}: {exc}"
        else:
            _numba_module = module
    return _numba_module


def available_backends() -> dict[str, str | None]:
    """Which backends can run here.

    Returns
    -------
    dict
        Backend name (``"cpp"``, ``"numba"``, ``"reference"``) -> ``None`` when usable, else the
        reason it is not.
    """
    _load_numba()
    return {
        "cpp": None if _ext.core is not None else f"C++ core not importable ({_ext.core_error})",
        "numba": None if _numba_module is not None else f"numba kernels not importable ({_numba_error})",
        "reference": None,
    }


def _pick_backend(backend: str) -> str:
    if backend == "auto":
        if _ext.core is not None:
            return "cpp"
        if _load_numba() is not None:
            _ext.warn_fallback_once("numba")
            return "numba"
        _ext.warn_fallback_once("NumPy reference")
        return "reference"
    if backend == "cpp":
        _ext.require_core()
        return "cpp"
    if backend == "numba":
        if _load_numba() is None:
            msg = f"backend='numba' requested but the Numba kernels could not be imported ({_numba_error})"
            raise BackendUnavailableError(msg)
        return "numba"
    if backend == "reference":
        return "reference"
    msg = f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}"
    raise ValueError(msg)


def _vector(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        msg = f"{name} must be a 1-D array, got shape {arr.shape}"
        raise ValueError(msg)
    return arr


def _int_vector(a: Any, name: str, allowed: tuple[type, ...]) -> np.ndarray:
    arr = _vector(a, name)
    if arr.size == 0 and arr.dtype.kind not in "iu":
        arr = arr.astype(allowed[0])  # np.asarray([]) is float64
    if arr.dtype.kind not in "iu":
        msg = f"{name} must have an integer dtype, got {arr.dtype}"
        raise TypeError(msg)
    if arr.dtype.type not in allowed:
        target = allowed[-1]
        info = np.iinfo(target)
        if arr.size and (arr.max() > info.max or arr.min() < info.min):
            msg = f"{name} has values outside the range of {np.dtype(target)}"
            raise ValueError(msg)
        arr = arr.astype(target)
    return np.ascontiguousarray(arr)


def _int_scalar(value: Any, name: str) -> int:
    try:
        out = operator.index(value)
    except TypeError:
        msg = f"{name} must be an integer, got {value!r}"
        raise TypeError(msg) from None
    if isinstance(value, bool):
        msg = f"{name} must be an integer, got {value!r}"
        raise TypeError(msg)
    return out


def _prepare(indptr, indices, data, col_token, token_median, totals, max_len, cls_token, eos_token):
    """Convert to the dtypes the kernels take and check shapes; errors name the argument."""
    indptr = _int_vector(indptr, "indptr", (np.int32, np.int64))
    indices = _int_vector(indices, "indices", (np.int32, np.int64))
    data = _vector(data, "data")
    if data.dtype.kind == "f" and data.dtype.itemsize < 4:
        data = data.astype(np.float32)  # float16 -> float32 is exact
    elif data.dtype.kind in "iub":
        data = data.astype(np.float64)  # integer counts, e.g. Cell Ranger's int32
    elif data.dtype.type not in (np.float32, np.float64):
        msg = f"data must hold real numbers (float32/float64 or integers), got {data.dtype}"
        raise TypeError(msg)
    data = np.ascontiguousarray(data)
    if indices.shape[0] != data.shape[0]:
        msg = f"indices and data must have the same length, got {indices.shape[0]} and {data.shape[0]}"
        raise ValueError(msg)
    if indptr.shape[0] < 1:
        msg = "indptr must have n_cells + 1 >= 1 elements, got an empty array"
        raise ValueError(msg)
    steps = np.diff(indptr)
    if indptr[0] < 0 or indptr[-1] > data.shape[0] or (steps.size and steps.min() < 0):
        msg = (
            f"indptr must be non-decreasing with 0 <= indptr[0] and indptr[-1] <= len(data)={data.shape[0]}; "
            f"got indptr[0]={int(indptr[0])}, indptr[-1]={int(indptr[-1])}"
        )
        raise ValueError(msg)
    n_cells = indptr.shape[0] - 1
    token_median = np.ascontiguousarray(_vector(token_median, "token_median"), dtype=np.float64)
    col_token = _int_vector(col_token, "col_token", (np.int32,))
    if col_token.size and col_token.max() >= token_median.shape[0]:
        c = int(np.flatnonzero(col_token >= token_median.shape[0])[0])
        msg = (
            f"col_token[{c}]={int(col_token[c])} is not a valid index into token_median "
            f"(length {token_median.shape[0]}); use -1 for genes outside the vocabulary"
        )
        raise ValueError(msg)
    if totals is not None:
        totals = np.ascontiguousarray(_vector(totals, "totals"), dtype=np.float64)
        if totals.shape[0] != n_cells:
            msg = f"totals must have one value per cell ({n_cells}), got {totals.shape[0]}"
            raise ValueError(msg)
    max_len = _int_scalar(max_len, "max_len")
    cls_token = _int_scalar(cls_token, "cls_token")
    eos_token = _int_scalar(eos_token, "eos_token")
    for name, tok in (("cls_token", cls_token), ("eos_token", eos_token)):
        if tok > _I32.max:
            msg = f"{name}={tok} does not fit in int32"
            raise ValueError(msg)
    # any negative special token means "none", as in the oracle; normalise for the int32 kernels
    cls_token, eos_token = max(cls_token, -1), max(eos_token, -1)
    return indptr, indices, data, col_token, token_median, totals, max_len, cls_token, eos_token


def _out_buffer(out: Any) -> np.ndarray | None:
    """``out`` checked for the core (errors name the argument); ``None`` stays ``None``."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray) or out.dtype != np.int32 or out.ndim != 1:
        msg = f"out must be a 1-D int32 numpy array, got {type(out).__name__} {getattr(out, 'dtype', '')}".rstrip()
        raise TypeError(msg)
    if not (out.flags.c_contiguous and out.flags.writeable):
        msg = "out must be C-contiguous and writeable"
        raise ValueError(msg)
    return out


def _index_error(row: int, entry: int, col: int, n_cols: int) -> ValueError:
    return ValueError(
        f"cell row {row} has gene column index {col} at stored entry {entry}, outside col_token "
        f"(length {n_cols}); indices must address the columns col_token was built for"
    )


def _check_indices(indptr: np.ndarray, indices: np.ndarray, n_cols: int) -> None:
    """Reference-backend twin of the kernels' column-index check (entries inside rows only)."""
    lo, hi = int(indptr[0]), int(indptr[-1])
    cols = indices[lo:hi]
    bad = (cols < 0) | (cols >= n_cols)
    if bad.any():
        j = lo + int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(indptr, j, side="right") - 1)
        raise _index_error(row, j, int(indices[j]), n_cols)


def rank_output_bound(indptr: np.ndarray, *, max_len: int, n_special: int) -> int:
    """Most tokens :func:`tokenize_rank` can return for a chunk: the size an ``out`` buffer needs.

    Parameters
    ----------
    indptr
        The chunk's CSR row pointer (``n_cells + 1``).
    max_len
        Model input size, special tokens included.
    n_special
        Number of special tokens added per non-empty cell (``<cls>`` and/or ``<eos>``: 0, 1 or 2).

    Returns
    -------
    int
        Sum over cells with stored entries of ``min(nnz, max_len - n_special) + n_special``.
    """
    nnz = np.diff(np.asarray(indptr, dtype=np.int64))
    budget = max(int(max_len) - int(n_special), 0)
    return int((np.minimum(nnz[nnz > 0], budget) + int(n_special)).sum())


def tokenize_rank(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    *,
    col_token: np.ndarray,
    token_median: np.ndarray,
    max_len: int,
    cls_token: int = -1,
    eos_token: int = -1,
    totals: np.ndarray | None = None,
    allow_non_integer: bool = False,
    backend: str = "auto",
    n_threads: int | None = None,
    out: np.ndarray | None = None,
    sums: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize a CSR chunk of cells by Geneformer's rank-value rule.

    Same arguments and results as :func:`scfm_fast.tokenizer.reference.rank_tokenize_ref`, bit for
    bit, on every backend.

    Parameters
    ----------
    indptr, indices, data
        CSR arrays of the chunk: ``indptr`` int32/int64 (``n_cells + 1``), ``indices`` int32/int64
        source gene columns, ``data`` counts (float32/float64; integer dtypes are converted).
    col_token
        Token id per source column (int32), negative for genes outside the vocabulary.
    token_median
        float64 gene median per token id.
    max_len
        Model input size, special tokens included.
    cls_token, eos_token
        Token ids to prepend / append, ``-1`` for none.
    totals
        Per-cell totals (``n_counts``); each row's sequential sum when ``None``.
    allow_non_integer
        Accept fractional counts.
    backend
        ``"auto"`` (C++, else Numba with a warning, else NumPy), ``"cpp"``, ``"numba"`` or
        ``"reference"``.
    n_threads
        Threads for the chunk; ``None`` = all available cores, but 1 inside a DataLoader worker or
        a forked process.
    out
        Optional reusable int32 buffer for the tokens (C++ backend only; ignored otherwise).  When
        it is 1-D, C-contiguous, writeable and at least :func:`rank_output_bound` long, the returned
        tokens are a view of its start, so the next call that passes it overwrites them: keep one
        per thread and reuse it only once the previous tokens are consumed.  This saves the page
        faults and zeroing of a fresh buffer on every call (~15% of the core's CPU on PBMC cells).
        When it is too small a fresh array is returned and ``out`` is untouched.
    sums
        Optional float64 array of 3, set to ``(total, matched, 1.0)`` when the C++ backend took the
        chunk's count sums (:func:`scfm_fast.tokenizer._sums.count_sums`, bit for bit) in its rank pass,
        which saves a second pass over the chunk; that needs integer counts (not
        ``allow_non_integer``) and rows that span the arrays.  Otherwise set to ``(0, 0, 0.0)``: call
        ``count_sums``.

    Returns
    -------
    tokens
        int32 concatenated token ids.
    offsets
        int64, ``n_cells + 1``; cell ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``.
    totals
        float64 total used for each cell.

    Raises
    ------
    CountDataError
        On the first (in stored order) NaN/Inf, negative or, unless allowed, non-integer count;
        same message as the oracle.
    ValueError
        On ``max_len`` too small for the special tokens, an out-of-range column index (naming the
        cell row), or malformed arrays (naming the argument).
    BackendUnavailableError
        When the requested backend cannot run here.
    """
    name = _pick_backend(backend)
    out = _out_buffer(out)
    if sums is not None:
        sums[:] = 0.0  # "not taken" unless the core sets it
    indptr, indices, data, col_token, token_median, totals, max_len, cls_token, eos_token = _prepare(
        indptr, indices, data, col_token, token_median, totals, max_len, cls_token, eos_token
    )
    allow_non_integer = bool(allow_non_integer)
    n_special = int(cls_token >= 0) + int(eos_token >= 0)
    budget = max_len - n_special
    if name == "reference" or budget < 1 or indptr[0] != 0 or indptr[-1] != data.shape[0]:
        # The oracle checks every stored count (even outside the rows) before max_len; the kernels
        # only visit the rows, so take the oracle's own check on these rare paths.
        check_counts_ref(indptr, data, allow_non_integer=allow_non_integer)
    if budget < 1:
        msg = f"max_len={max_len} leaves no room for genes after {n_special} special tokens"
        raise ValueError(msg)
    threads = _ext.resolve_n_threads(n_threads)
    n_cols = col_token.shape[0]

    if name == "reference":
        _check_indices(indptr, indices, n_cols)
        return rank_tokenize_ref(
            indptr,
            indices,
            data,
            col_token=col_token,
            token_median=token_median,
            max_len=max_len,
            cls_token=cls_token,
            eos_token=eos_token,
            totals=totals,
            allow_non_integer=allow_non_integer,
        )
    if name == "cpp":
        core = _ext.core
        try:
            return core.rank_tokenize(
                indptr,
                indices,
                data,
                col_token,
                token_median,
                totals,
                budget,
                cls_token,
                eos_token,
                allow_non_integer,
                threads,
                out=out,
                sums=sums,
            )
        except core.CellDataError as exc:
            kind, row, entry, col = exc.args
            error = (1 if kind == "count" else 2, row, entry, col)
    else:
        nb = _numba_module
        tokens, offsets, cell_totals, error = nb.rank_tokenize_numba(
            indptr.astype(np.int64, copy=False),
            indices,
            data,
            col_token,
            token_median,
            totals,
            budget,
            cls_token,
            eos_token,
            allow_non_integer,
            threads,
        )
        if error[0] == nb.ERR_NONE:
            return tokens, offsets, cell_totals
    kind, row, entry, col = error
    if kind == 1:
        text = _count_error(row, entry, float(data[entry]), allow_non_integer=allow_non_integer)
        raise CountDataError(text)
    raise _index_error(row, entry, col, n_cols)
