"""The match report's count sums: the C++ core equals the Numba kernel and a sequential Python sum."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast import _ext
from scfm_fast.tokenizer._sums import count_sums

needs_core = pytest.mark.skipif(_ext.core is None, reason=f"C++ core not built: {_ext.core_error}")


def _sequential(indices, data, col_token):
    tot = matched = 0.0
    for j, v in zip(indices.tolist(), data.astype(np.float64).tolist(), strict=True):
        tot += v
        if col_token[j] >= 0:
            matched += v
    return tot, matched


@pytest.fixture(scope="module")
def real_chunk(shared_dir):
    """Real PBMC counts (float32, as read from h5ad) and a column map dropping about a third of genes."""
    anndata = pytest.importorskip("anndata")
    path = shared_dir / "data" / "human" / "scvi_pbmc_5k_protein_v3_200cells.h5ad"
    if not path.exists():
        pytest.skip(f"{path} not found")
    X = np.asarray(anndata.read_h5ad(path).X, dtype=np.float32)
    rows, cols = np.nonzero(X)
    col_token = np.where(np.random.default_rng(0).random(X.shape[1]) < 0.66, 1, -1).astype(np.int32)
    return cols.astype(np.int32), X[rows, cols], col_token


@needs_core
@pytest.mark.parametrize(("ix", "dt"), [(np.int32, np.float32), (np.int64, np.float64), (np.int32, np.float64)])
def test_core_equals_sequential_and_numba(real_chunk, ix, dt):
    from scfm_fast.tokenizer._sums_numba import count_sums_numba

    indices, data, col_token = real_chunk
    indices, data = indices.astype(ix), data.astype(dt)
    # fractional values make the float64 sum order-sensitive, so "sequential" is really checked
    data = data * dt(1.1)
    want = _sequential(indices, data, col_token)
    got = count_sums(indices, data, col_token)
    assert got == want
    assert got == count_sums_numba(indices, data, col_token)
    assert 0 < got[1] < got[0]



@needs_core
@pytest.mark.parametrize("case", ["integers", "one_fraction", "nan", "inf", "negative", "neg_zero", "huge",
                                  "short", "no_columns"])
def test_edge_cases_equal_the_sequential_definition(real_chunk, case):
    """Fractional, non-finite, negative, signed-zero and huge counts: the core's sums equal the sequential
    float64 definition bit for bit (signs of zero included)."""
    indices, data, col_token = real_chunk
    data = data.astype(np.float64).copy()
    if case == "one_fraction":
        data[len(data) // 2] += 0.1  # one fractional count: the whole order matters again
    elif case == "nan":
        data[7] = np.nan
    elif case == "inf":
        data[7] = np.inf
    elif case == "negative":
        data[::3] *= -1
    elif case == "neg_zero":
        data[:] = -0.0
    elif case == "huge":
        data[3] = 2.0**52  # partial sums beyond 2^53 round: the order matters
        data[4] = 3.0
    elif case == "short":
        indices, data = indices[:3], data[:3]
    elif case == "no_columns":
        with pytest.raises(ValueError, match="outside col_token"):
            _ext.core.count_sums(indices[:5], data[:5], np.zeros(0, np.int32))
        return
    want = _sequential(indices, data, col_token)
    got = _ext.core.count_sums(indices, data, col_token)
    assert np.array_equal(np.array(got), np.array(want), equal_nan=True)
    assert [np.signbit(x) for x in got] == [np.signbit(x) for x in want]


@needs_core
def test_core_refuses_out_of_range_columns():
    with pytest.raises(ValueError, match="stored entry 1 has a gene column index outside col_token"):
        _ext.core.count_sums(np.array([0, 3], np.int32), np.ones(2, np.float32), np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="outside col_token"):
        _ext.core.count_sums(np.array([-1], np.int64), np.ones(1, np.float64), np.zeros(3, np.int32))


def test_empty_and_fallback_dtypes():
    assert count_sums(np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(2, np.int32)) == (0.0, 0.0)
    # integer data takes the Numba path; same answer
    got = count_sums(np.array([0, 1, 1], np.int32), np.array([2, 3, 4], np.int32), np.array([5, -1], np.int32))
    assert got == (9.0, 2.0)


@needs_core
def test_tokenize_does_not_import_numba_with_the_core(tmp_path):
    # numba costs ~0.4 s of CPU per process to import; with the core built, a whole tokenize run
    # (match report included) must not need it
    import subprocess
    import sys
    from pathlib import Path

    import scfm_fast

    demo = Path(scfm_fast.__file__).parent / "data" / "demo" / "pbmc_200cells.h5ad"
    code = ("import sys; from scfm_fast.tokenizer.pipeline import tokenize_corpus; "
            f"tokenize_corpus({str(demo)!r}, {str(tmp_path / 'o')!r}, progress_bar=False); "
            "print('numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
