"""The C++ core's direct gather and its fallbacks, against the NumPy oracle bit for bit.

The core takes the direct gather (key = count / median straight from each stored entry, no per-token
accumulator) when col_token maps no two columns onto one token and the chunk holds at least as many
stored entries as there are columns and tokens; a row whose column indices do not strictly increase
falls back to the accumulator, and so does every row of a call whose col_token is not injective or
whose chunk is smaller.  The chunks below are built to land on each side of each of those rules.  On CPUs with AVX-512 the
direct gather and the per-row check have AVX-512 twins (eight entries per step, masked row tails);
every test runs with both.
"""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast._errors import CountDataError
from scfm_fast.tokenizer.rank import tokenize_rank
from scfm_fast.tokenizer.reference import rank_tokenize_ref
from tests.tokenizer._same_error import same_count_error

pytest.importorskip("scfm_fast._core")
# every test here runs with the scalar gathers and with the AVX-512 ones
pytestmark = pytest.mark.usefixtures("gather_simd")


def _assert_same(out, ref):
    for got, want in zip(out, ref):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    # totals bit for bit (-0.0 vs 0.0, NaN payloads)
    np.testing.assert_array_equal(out[2].view(np.int64), ref[2].view(np.int64))


def _both(indptr, indices, data, *, n_threads=1, **kw):
    ref = rank_tokenize_ref(indptr, indices, data, **kw)
    out = tokenize_rank(indptr, indices, data, backend="cpp", n_threads=n_threads, **kw)
    _assert_same(out, ref)
    return out


def _vocab(rng, n_cols, *, extra_tokens=40, unmapped=0.1):
    """Injective col_token (some columns unmapped, some tokens unused); medians with exact repeats so
    that equal counts tie and only the token order decides."""
    n_tokens = n_cols + extra_tokens
    col_token = rng.permutation(n_tokens)[:n_cols].astype(np.int32)
    col_token[rng.random(n_cols) < unmapped] = -1
    token_median = np.where(rng.random(n_tokens) < 0.3, rng.choice([0.5, 1.0, 2.0], n_tokens),
                            rng.lognormal(0.0, 1.5, n_tokens))
    return col_token, token_median


def _rows_to_csr(rows, *, dtype=np.float32, idx_dtype=np.int32, ptr_dtype=np.int64):
    indptr = np.zeros(len(rows) + 1, dtype=ptr_dtype)
    np.cumsum([len(c) for c, _ in rows], out=indptr[1:])
    indices = np.concatenate([np.asarray(c, dtype=np.int64) for c, _ in rows]).astype(idx_dtype)
    data = np.concatenate([np.asarray(v, dtype=np.float64) for _, v in rows]).astype(dtype)
    return indptr, indices, data


def _canonical_rows(rng, n_cells, n_cols, *, fractional=False):
    """Sorted, repeat-free rows (PBMC-like counts, mostly 1, some explicit zeros), an empty row, a
    one-entry row and a row holding every column."""
    rows = []
    for i in range(n_cells):
        nnz = {1: 0, 2: 1, 3: n_cols}.get(i, int(rng.integers(1, n_cols)))
        cols = np.sort(rng.choice(n_cols, nnz, replace=False))
        vals = rng.geometric(0.55, nnz).astype(np.float64)
        vals[rng.random(nnz) < 0.05] = 0.0
        if fractional:
            vals = vals * rng.choice([1.0, 0.5, 1 / 3, 0.1], nnz)
        rows.append((cols, vals))
    return rows


PRESETS = [dict(max_len=4096), dict(max_len=30), dict(max_len=9, cls_token=3, eos_token=4),
           dict(max_len=2, cls_token=0)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("idx_dtype", "ptr_dtype"), [(np.int32, np.int64), (np.int64, np.int32)])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("with_totals", [False, True], ids=["row-sum", "given-totals"])
def test_direct_gather_matches_reference(dtype, idx_dtype, ptr_dtype, n_threads, with_totals):
    rng = np.random.default_rng(21)
    n_cols = 240
    col_token, token_median = _vocab(rng, n_cols)
    indptr, indices, data = _rows_to_csr(_canonical_rows(rng, 60, n_cols), dtype=dtype,
                                         idx_dtype=idx_dtype, ptr_dtype=ptr_dtype)
    assert indptr[-1] >= token_median.size  # large enough for the direct gather
    totals = rng.choice([0.0, 100.0, np.nan, -1.0, 5e3, 1e-300], 60) if with_totals else None
    for preset in PRESETS:
        out = _both(indptr, indices, data, col_token=col_token, token_median=token_median, totals=totals,
                    n_threads=n_threads, **preset)
        assert np.diff(out[1]).max() <= preset["max_len"]
    # fractional counts take the same path
    indptr, indices, data = _rows_to_csr(_canonical_rows(rng, 60, n_cols, fractional=True), dtype=dtype)
    _both(indptr, indices, data, col_token=col_token, token_median=token_median, totals=totals,
          allow_non_integer=True, n_threads=n_threads, max_len=50)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("with_totals", [False, True], ids=["row-sum", "given-totals"])
def test_rows_with_repeated_or_unsorted_columns_fall_back(n_threads, with_totals):
    # Canonical rows around rows the direct gather must refuse.  A repeated column has to be summed
    # (1 + 2 = 3 outranks the other counts of 2) and its row total counted once: the fallback
    # restarts the row, so a half-done row sum must not leak into it.
    rng = np.random.default_rng(8)
    n_cols = 120
    col_token, token_median = _vocab(rng, n_cols, unmapped=0.0)
    token_median[col_token] = 1.0  # equal medians: the summed repeat must rank first by its key
    good = _canonical_rows(rng, 30, n_cols)
    odd = [
        ([5, 7, 7, 9], [2, 1, 2, 2]),  # adjacent repeat
        ([3, 10, 20, 3], [1, 2, 2, 2]),  # repeat at the last entry, after larger columns
        ([40, 2, 90, 11], [1, 4, 2, 3]),  # unsorted, no repeat
        ([6, 6, 6], [0, 0, 5]),  # explicit zeros then a count, one column
        ([8, 8], [0, 0]),  # only zeros: no tokens
        (list(range(n_cols)) + [0], [1.0] * n_cols + [1.0]),  # a full row plus a repeat of column 0
    ]
    rows = []
    for i, row in enumerate(good):
        rows.append(row)
        if i % 5 == 0:
            rows.append(odd[(i // 5) % len(odd)])
    rows += odd
    indptr, indices, data = _rows_to_csr(rows)
    assert indptr[-1] >= token_median.size
    totals = rng.choice([50.0, 0.0, 7e3], len(rows)) if with_totals else None
    out = _both(indptr, indices, data, col_token=col_token, token_median=token_median, totals=totals,
                n_threads=n_threads, max_len=4096)
    first_odd = len(rows) - len(odd)
    cell = out[0][out[1][first_odd] : out[1][first_odd + 1]]
    if not with_totals:
        assert cell.tolist()[0] == col_token[7]  # 1 + 2 summed, ahead of the 2s
        assert out[2][first_odd] == 7.0


def test_shared_tokens_anywhere_in_the_vocabulary_use_the_accumulator():
    # mostly one column per token, but two columns (far apart) share one: every row must sum them
    rng = np.random.default_rng(3)
    n_cols = 200
    col_token, token_median = _vocab(rng, n_cols, unmapped=0.05)
    col_token[[17, 180]] = col_token[150] if col_token[150] >= 0 else 11
    rows = _canonical_rows(rng, 40, n_cols)
    rows.append(([17, 150, 180], [1.0, 1.0, 1.0]))
    indptr, indices, data = _rows_to_csr(rows)
    assert indptr[-1] >= token_median.size
    for n_threads in (1, 2):
        for with_totals in (False, True):
            totals = np.full(len(rows), 1e4) if with_totals else None
            _both(indptr, indices, data, col_token=col_token, token_median=token_median, totals=totals,
                  n_threads=n_threads, max_len=60, cls_token=1, eos_token=2)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_odd_medians_and_signed_zeros_direct():
    # median 0 -> +inf key, inf -> 0 key (dropped), NaN -> NaN key (last, ties by token), negative ->
    # negative key, 1e-300 with a huge count -> inf, 1e300 with a subnormal count -> 0 (dropped);
    # -0.0 counts are valid zeros (dropped; a row of only -0.0 sums to -0.0)
    rng = np.random.default_rng(4)
    n_cols = 64
    col_token, token_median = _vocab(rng, n_cols, unmapped=0.0)
    odd = np.array([0.0, np.inf, np.nan, -2.0, np.nan, 0.0, -np.inf, 1e-300, 1e300])
    token_median[col_token[: odd.size]] = odd
    rows = _canonical_rows(rng, 40, n_cols, fractional=True)
    rows.append((list(range(10)), [1, 2, 3, 4, 5, 6, 7, 1e300, 5e-324, 1]))
    rows.append(([0, 4, 30], [-0.0, -0.0, -0.0]))
    rows.append(([1, 6, 8], [3.0, 2.0, 5e-324]))  # keys 0, -0.0 and 0: an empty cell
    indptr, indices, data = _rows_to_csr(rows, dtype=np.float64)
    assert indptr[-1] >= token_median.size
    for n_threads in (1, 2):
        out = _both(indptr, indices, data, col_token=col_token, token_median=token_median,
                    allow_non_integer=True, n_threads=n_threads, max_len=200)
        assert np.signbit(out[2][-2]) and out[1][-1] == out[1][-3]


@pytest.mark.parametrize("n_threads", [1, 2])
def test_chunk_size_rule_does_not_change_tokens(n_threads):
    # whole chunk (direct), one cell per call (accumulated: too few entries for the column table),
    # and chunks just below / at the size rule all give the oracle's tokens
    rng = np.random.default_rng(5)
    n_cols = 150
    col_token, token_median = _vocab(rng, n_cols, extra_tokens=0)
    indptr, indices, data = _rows_to_csr(_canonical_rows(rng, 25, n_cols))
    kw = dict(col_token=col_token, token_median=token_median, max_len=40, eos_token=9)
    whole = _both(indptr, indices, data, n_threads=n_threads, **kw)
    for i in range(25):
        one = tokenize_rank(indptr[i : i + 2], indices, data, backend="cpp", **kw)
        np.testing.assert_array_equal(one[0], whole[0][whole[1][i] : whole[1][i + 1]])
    # a chunk of exactly n_cols entries (direct) and one of n_cols - 1 (accumulated)
    rows = [(np.arange(n_cols), rng.integers(1, 9, n_cols))]
    for cut in (n_cols, n_cols - 1):
        sub = _rows_to_csr([(rows[0][0][:cut], rows[0][1][:cut])])
        _both(*sub, n_threads=n_threads, **kw)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("bad", [np.nan, -1.0, 2.5, np.inf])
def test_bad_counts_reported_as_before(n_threads, bad):
    rng = np.random.default_rng(6)
    n_cols = 100
    col_token, token_median = _vocab(rng, n_cols)
    indptr, indices, data = _rows_to_csr(_canonical_rows(rng, 40, n_cols), dtype=np.float64)
    data = data.copy()
    late = int(indptr[35]) + 1  # in the second thread's range: the earlier one must still win
    data[late] = -3.0
    early = int(indptr[12]) + 2
    data[early] = bad
    msg = same_count_error(indptr, indices, data, backend="cpp", n_threads=n_threads, col_token=col_token,
                           token_median=token_median, max_len=30)
    assert f"stored entry {early}" in msg and "cell row 12 " in msg


@pytest.mark.parametrize("n_threads", [1, 2])
def test_bad_indices_reported_as_before(n_threads):
    rng = np.random.default_rng(7)
    n_cols = 100
    col_token, token_median = _vocab(rng, n_cols)
    indptr, indices, data = _rows_to_csr(_canonical_rows(rng, 40, n_cols))
    indices = indices.copy()
    indices[int(indptr[30]) + 1] = n_cols
    indices[int(indptr[36])] = -4  # a later one in the other thread's range
    kw = dict(col_token=col_token, token_median=token_median, max_len=30)
    with pytest.raises(ValueError) as want:
        tokenize_rank(indptr, indices, data, backend="reference", **kw)
    with pytest.raises(ValueError) as got:
        tokenize_rank(indptr, indices, data, backend="cpp", n_threads=n_threads, **kw)
    assert str(got.value) == str(want.value)
    assert "cell row 30 " in str(got.value) and not isinstance(got.value, CountDataError)


def test_long_chunk_on_two_threads():
    # thousands of long cells: two ranges written into one buffer, slid together and shrunk; equal to
    # calls over slices (one range each) and to the oracle
    rng = np.random.default_rng(9)
    n_cols = 2200
    col_token, token_median = _vocab(rng, n_cols, unmapped=0.02)
    mask = rng.random((1200, n_cols)) < 0.85
    rows, cols = np.nonzero(mask)
    indptr = np.zeros(mask.shape[0] + 1, dtype=np.int64)
    np.cumsum(mask.sum(axis=1), out=indptr[1:])
    indices = cols.astype(np.int32)
    data = rng.geometric(0.55, cols.size).astype(np.float32)
    kw = dict(col_token=col_token, token_median=token_median, max_len=2048, cls_token=0, eos_token=1)
    whole = tokenize_rank(indptr, indices, data, backend="cpp", n_threads=2, **kw)
    for lo in range(0, mask.shape[0], 400):
        hi = min(lo + 400, mask.shape[0])
        part = tokenize_rank(indptr[lo : hi + 1], indices, data, backend="cpp", n_threads=1, **kw)
        np.testing.assert_array_equal(part[0], whole[0][whole[1][lo] : whole[1][hi]])
        np.testing.assert_array_equal(part[1] + whole[1][lo], whole[1][lo : hi + 1])
    few = rank_tokenize_ref(indptr[:41], indices, data, **kw)
    np.testing.assert_array_equal(few[0], whole[0][: whole[1][40]])


# (row, offset into the row, kind): "count" stores a bad count there, "index" a bad column.
BAD_CELLS = [
    pytest.param([(10, 3, "index"), (40, 0, "count")], id="index-then-later-count"),
    pytest.param([(5, 1, "index"), (10, 2, "count")], id="count-after-earlier-index"),
    pytest.param([(10, 0, "index"), (45, 4, "index")], id="two-indices"),
    pytest.param([(10, 0, "index"), (10, 5, "count")], id="index-then-count-in-one-row"),
    pytest.param([(20, 2, "count"), (21, 0, "count")], id="two-counts"),
    pytest.param([(59, -1, "count")], id="last-entry"),
]


@pytest.mark.parametrize("bad", BAD_CELLS)
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("with_totals", [False, True], ids=["row-sum", "given-totals"])
def test_bad_cells_among_clean_cells(bad, n_threads, with_totals):
    # Each row is checked on its own before its gather: clean rows (sorted ones, and unsorted ones
    # that fall back to the accumulator) take the fast gathers and rows with bad input the checked
    # loop, yet the error must be the oracle's (any bad count before any bad index, lowest entry
    # first), whichever rows surround it, however the rows are split over threads, and also when
    # the bad row's given total keeps it from being tokenized.
    rng = np.random.default_rng(11)
    n_cols = 240
    col_token, token_median = _vocab(rng, n_cols)
    rows = _canonical_rows(rng, 60, n_cols)
    for i in (7, 30, 52):
        rows[i] = (rows[i][0][::-1], rows[i][1])  # unsorted: the accumulated gather
    indptr, indices, data = _rows_to_csr(rows, dtype=np.float64)
    assert indptr[-1] >= token_median.size  # large enough for the direct gather
    indices, data = indices.copy(), data.copy()
    for row, offset, kind in bad:
        entry = int(indptr[row + 1] - 1 if offset < 0 else indptr[row] + offset)
        assert indptr[row] <= entry < indptr[row + 1]
        if kind == "count":
            data[entry] = rng.choice([np.nan, -1.0, 2.5, np.inf])
        else:
            indices[entry] = rng.choice([n_cols, -3])
    totals = None
    if with_totals:
        totals = rng.choice([50.0, 7e3], 60)
        totals[[row for row, _, _ in bad][-1]] = 0.0  # the last bad row is not tokenized
    kw = dict(col_token=col_token, token_median=token_median, totals=totals, max_len=30)
    with pytest.raises(ValueError) as want:
        tokenize_rank(indptr, indices, data, backend="reference", **kw)
    with pytest.raises(ValueError) as got:
        tokenize_rank(indptr, indices, data, backend="cpp", n_threads=n_threads, **kw)
    assert type(got.value) is type(want.value)
    assert str(got.value) == str(want.value)
    # the same chunk without the bad entries tokenizes as the oracle does
    kw["totals"] = None
    _both(*_rows_to_csr(rows, dtype=np.float64), n_threads=n_threads, **kw)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("shared", [False, True], ids=["direct", "accumulated"])
def test_nan_keys_of_either_sign_and_signed_keys(shared):
    # The gathers write keys unchecked and look at NaN, zero and negative keys only when the cell's
    # order bounds say one may be present: NaN medians of either sign (NaN keys rank last, ties by
    # token), negative keys, keys of +-inf, and cells holding only one of these.
    rng = np.random.default_rng(12)
    n_cols = 64
    col_token, token_median = _vocab(rng, n_cols, unmapped=0.0)
    if shared:
        col_token[40] = col_token[41]  # two columns on one token: every row accumulates
    odd = np.array([np.nan, np.copysign(np.nan, -1.0), -2.0, -0.5, np.inf, -np.inf, 0.0, 1e-300])
    token_median[col_token[: odd.size]] = odd
    rows = _canonical_rows(rng, 40, n_cols, fractional=True)
    rows += [
        ([0, 1, 10, 11], [1.0, 3.0, 2.0, 2.0]),  # NaN keys of both signs among positive keys
        ([1, 0], [2.0, 5.0]),  # only NaN keys (unsorted)
        ([2, 3], [4.0, 1.0]),  # only negative keys
        ([2, 3, 12, 13], [4.0, 1.0, 1.0, 2.0]),  # negative and positive keys
        ([6, 12], [1.0, 1.0]),  # an infinite key (count / 0: the first order of a non-NaN key), a finite one
        ([4, 5, 6, 7], [1.0, 2.0, 3.0, 1e300]),  # zero keys of both signs (count / +-inf), two infinite keys
        ([4, 5], [1.0, 1.0]),  # only zero keys: no tokens
    ]
    indptr, indices, data = _rows_to_csr(rows, dtype=np.float64)
    assert indptr[-1] >= token_median.size
    for n_threads in (1, 2):
        _both(indptr, indices, data, col_token=col_token, token_median=token_median,
              allow_non_integer=True, n_threads=n_threads, max_len=200, cls_token=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_totals", [False, True], ids=["row-sum", "given-totals"])
def test_row_lengths_around_the_vector_width(dtype, with_totals):
    # The AVX-512 gather takes eight entries per step and a masked tail: rows of 0..33 entries, and
    # copies with one out-of-order pair at every position (first lane, last lane of a step, the
    # tail) that must fall back to the accumulator; unmapped columns and zero counts in every lane.
    rng = np.random.default_rng(13)
    n_cols = 64
    col_token, token_median = _vocab(rng, n_cols, unmapped=0.15)
    rows = []
    for length in range(34):
        cols = np.sort(rng.choice(n_cols, length, replace=False))
        vals = rng.geometric(0.5, length).astype(np.float64)
        vals[rng.random(length) < 0.1] = 0.0
        rows.append((cols, vals))
        for p in range(length - 1):
            swapped = cols.copy()
            swapped[[p, p + 1]] = swapped[[p + 1, p]]
            rows.append((swapped, vals))
    rows.append(([3, 9, 17], [-0.0, -0.0, -0.0]))  # sums to -0.0
    indptr, indices, data = _rows_to_csr(rows, dtype=dtype)
    assert indptr[-1] >= token_median.size
    totals = rng.choice([0.0, 30.0, 1e4], len(rows)) if with_totals else None
    for n_threads in (1, 2):
        _both(indptr, indices, data, col_token=col_token, token_median=token_median, totals=totals,
              n_threads=n_threads, max_len=20, cls_token=0)


def test_huge_integer_counts_keep_the_stored_order_sum():
    # Integer counts whose sum passes 2^53 round differently in another order (2^53 + 1 + 1 is 2^53
    # in stored order, 2^53 + 2 summed pairwise): the AVX-512 gather's lane sums must give way to the
    # stored-order sum there, so totals stay the oracle's bit for bit.
    rng = np.random.default_rng(14)
    n_cols = 48
    col_token, token_median = _vocab(rng, n_cols, unmapped=0.0)
    rows = _canonical_rows(rng, 20, n_cols)
    rows += [
        (list(range(12)), [2.0**53] + [1.0] * 11),
        (list(range(20)), [1.0] * 19 + [2.0**53]),
        (list(range(9)), [2.0**52, 2.0**52 - 1] + [1.0] * 7),
        (list(range(30)), [3.0**30] * 30),
    ]
    indptr, indices, data = _rows_to_csr(rows, dtype=np.float64)
    assert indptr[-1] >= token_median.size
    out = _both(indptr, indices, data, col_token=col_token, token_median=token_median, max_len=40)
    assert out[2][-4] == 2.0**53  # the stored-order sum, not 2^53 + 11
