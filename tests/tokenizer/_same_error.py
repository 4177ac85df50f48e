"""The one check that a fast backend refuses bad counts exactly as the NumPy oracle does."""

from __future__ import annotations

import pytest

from scfm_fast._errors import CountDataError
from scfm_fast.tokenizer.rank import tokenize_rank
from scfm_fast.tokenizer.reference import rank_tokenize_ref


def same_count_error(indptr, indices, data, *, backend: str, n_threads: int | None = None, **kw) -> str:
    """Both the oracle and ``tokenize_rank(backend=...)`` raise :class:`CountDataError` with the same message;
    returns it (for the caller's own checks of row / entry)."""
    with pytest.raises(CountDataError) as want:
        rank_tokenize_ref(indptr, indices, data, **kw)
    with pytest.raises(CountDataError) as got:
        tokenize_rank(indptr, indices, data, backend=backend, n_threads=n_threads, **kw)
    assert str(got.value) == str(want.value)
    return str(got.value)
