"""The match report's count sums: the C++ core equals the Numba kernel and a sequential Python sum, and the
sums the rank core takes in its own pass (``tokenize_rank(..., sums=)``) equal them bit for bit whenever it
reports them, and are left to ``count_sums`` where that cannot be shown."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast import _ext
from scfm_fast.tokenizer._sums import count_sums
from scfm_fast.tokenizer.rank import tokenize_rank

needs_core = pytest.mark.skipif(_ext.core is None, reason=f"C++ core not built: {_ext.core_error}")


def _sequential(indices, data, col_token):
    tot = matched = 0.0
    for j, v in zip(indices.tolist(), data.astype(np.float64).tolist(), strict=True):
        tot += v
        if col_token[j] >= 0:
            matched += v
    return tot, matched


@pytest.fixture(scope="module")
def real_csr(shared_dir):
    """Real PBMC counts as CSR (float32, as read from h5ad)."""
    anndata = pytest.importorskip("anndata")
    import scipy.sparse as sp

    path = shared_dir / "data" / "human" / "scvi_pbmc_5k_protein_v3_200cells.h5ad"
    if not path.exists():
        pytest.skip(f"{path} not found")
    X = sp.csr_matrix(anndata.read_h5ad(path).X, dtype=np.float32)
    return X.indptr.astype(np.int64), X.indices.astype(np.int32), X.data


@pytest.fixture(scope="module")
def real_chunk(real_csr):
    """The stored entries and a column map dropping about a third of genes."""
    _, indices, data = real_csr
    n_cols = int(indices.max()) + 1
    col_token = np.where(np.random.default_rng(0).random(n_cols) < 0.66, 1, -1).astype(np.int32)
    return indices, data, col_token


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


@pytest.fixture(scope="module")
def ranked(real_csr):
    """The CSR chunk with ~95% of genes on distinct tokens (the rank core's direct gather) and medians."""
    indptr, indices, data = real_csr
    rng = np.random.default_rng(7)
    n_cols = int(indices.max()) + 1
    col_token = np.where(rng.random(n_cols) < 0.95, rng.permutation(n_cols), -1).astype(np.int32)
    return indptr, indices, data, col_token, rng.uniform(0.5, 20.0, n_cols)


def _rank(indptr, indices, data, col_token, median, **kw):
    return tokenize_rank(indptr, indices, data, col_token=col_token, token_median=median, max_len=2048,
                         backend=kw.pop("backend", "cpp"), **kw)


@pytest.mark.usefixtures("gather_simd")
@needs_core
@pytest.mark.parametrize(("ip", "ix", "dt"), [(np.int64, np.int32, np.float32), (np.int32, np.int64, np.float64),
                                              (np.int32, np.int32, np.float32)])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("given", [False, True])
def test_sums_of_the_rank_pass_equal_count_sums(ranked, ip, ix, dt, threads, given):
    indptr, indices, data, col_token, median = ranked
    indptr, indices, data = indptr.astype(ip), indices.astype(ix), data.astype(dt)
    totals = np.add.reduceat(data.astype(np.float64), indptr[:-1].astype(np.int64)) if given else None
    sums = np.full(3, np.nan)
    got = _rank(indptr, indices, data, col_token, median, totals=totals, n_threads=threads, sums=sums)
    assert sums[2] == 1.0
    assert (sums[0], sums[1]) == count_sums(indices, data, col_token) == _sequential(indices, data, col_token)
    assert 0 < sums[1] < sums[0]
    # taking the sums changes nothing else, the computed cell totals included
    want = _rank(indptr, indices, data, col_token, median, totals=totals, n_threads=threads)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def _case(case, indptr, indices, data, col_token, median):
    """Inputs for which the rank pass cannot show its sums exact, and the keywords to call it with."""
    kw = {}
    if case == "allow_non_integer":
        data = data * np.float32(1.1)
        kw["allow_non_integer"] = True
    elif case == "repeated_column":  # row 5 stores its first column twice: the accumulated gather
        k = int(indptr[5])
        indices = np.insert(indices, k, indices[k])
        data = np.insert(data, k, np.float32(2))
        indptr = indptr.copy()
        indptr[6:] += 1
    elif case == "two_columns_one_token":  # e.g. --gene-mapping-file collapsing ids: no direct gather
        col_token = col_token.copy()
        col_token[indices[0]] = col_token[indices[1]]
    elif case == "cell_without_total":  # a given total of 0: its row is not read
        kw["totals"] = np.add.reduceat(data.astype(np.float64), indptr[:-1])
        kw["totals"][3] = 0.0
    elif case == "rows_inside_the_arrays":  # stored entries before the first row
        indices = np.concatenate([indices[:4], indices])
        data = np.concatenate([data[:4], data])
        indptr = indptr + 4
    elif case == "total_from_2_53":  # exact integers no more: the order matters
        data = data.astype(np.float64)
        data[:2] = 2.0**52
    elif case in ("numba", "reference"):
        if case == "numba":
            pytest.importorskip("numba")
        kw["backend"] = case
    return (indptr, indices, data, col_token, median), kw


@pytest.mark.usefixtures("gather_simd")
@needs_core
@pytest.mark.parametrize("case", ["allow_non_integer", "repeated_column", "two_columns_one_token",
                                  "cell_without_total", "rows_inside_the_arrays", "total_from_2_53", "numba",
                                  "reference"])
def test_sums_are_left_to_count_sums_where_not_shown_exact(ranked, case):
    args, kw = _case(case, *ranked)
    sums = np.full(3, np.nan)
    got = _rank(*args, sums=sums, **kw)
    assert sums.tolist() == [0.0, 0.0, 0.0]
    want = _rank(*args, **kw)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


@needs_core
def test_bad_sums_buffer_is_refused(ranked):
    indptr, indices, data, col_token, median = ranked
    with pytest.raises(ValueError, match="3 elements"):
        _rank(indptr, indices, data, col_token, median, sums=np.zeros(2))
    with pytest.raises(TypeError, match="float64"):
        _rank(indptr, indices, data, col_token, median, sums=np.zeros(3, np.float32))


@needs_core
def test_genecompass_values_take_the_same_sums(ranked):
    from scfm_fast.tokenizer.values import tokenize_values

    indptr, indices, data, col_token, median = ranked
    sums = np.full(3, np.nan)
    got = tokenize_values(indptr, indices, data, col_token=col_token, token_median=median, backend="cpp",
                          sums=sums)
    assert sums[2] == 1.0 and (sums[0], sums[1]) == count_sums(indices, data, col_token)
    want = tokenize_values(indptr, indices, data, col_token=col_token, token_median=median, backend="cpp")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    tokenize_values(indptr, indices, data, col_token=col_token, token_median=median, backend="reference",
                    sums=sums)
    assert sums.tolist() == [0.0, 0.0, 0.0]


@needs_core
def test_the_match_report_is_the_same_from_the_rank_pass(tmp_path, monkeypatch):
    """A run's manifest sums: from the rank pass (C++) equal those of count_sums (reference backend)."""
    from pathlib import Path

    import scfm_fast
    from scfm_fast.tokenizer import pipeline

    demo = Path(scfm_fast.__file__).parent / "data" / "demo" / "pbmc_200cells.h5ad"
    calls = []
    real = pipeline._count_sums
    monkeypatch.setattr(pipeline, "_count_sums", lambda *a: calls.append(1) or real(*a))
    fast = pipeline.tokenize_corpus(str(demo), tmp_path / "cpp", backend="cpp", chunk_size=100, progress_bar=False)
    assert calls == []  # every chunk's sums came from the rank pass
    ref = pipeline.tokenize_corpus(str(demo), tmp_path / "ref", backend="reference", chunk_size=100,
                                   progress_bar=False)
    assert calls  # the reference backend leaves them to count_sums
    for key in ("counts_total", "counts_matched", "fraction_counts_matched"):
        assert fast["summary"][key] == ref["summary"][key] > 0
