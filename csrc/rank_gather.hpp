// The two per-cell gathers of the rank core (see rank_tokenize.cpp) and the checks and tables they
// rely on.  Included by rank_tokenize.cpp only.
#pragma once

#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "rank_sort.hpp"
#include "rank_tokenize.hpp"

namespace scfm {
namespace rank_detail {

// Counts must be finite, >= 0, and integers unless allowed; same tests as check_counts_ref.
inline bool bad_count(double v, bool allow_non_integer) {
    if (!std::isfinite(v) || v < 0) return true;
    if (allow_non_integer) return false;
    // v != floor(v) without a libm call (baseline x86-64 has no SSE4.1 round): every double of
    // magnitude >= 2**52 is an integer, and below that the int64 round trip is exact.
    return v < 0x1p52 && v != static_cast<double>(static_cast<i64>(v));
}

// True when every stored entry in [lo, hi) has a valid count (same rule as bad_count) and a column
// index inside [0, n_cols).  Written without branches or early exits so the compiler vectorizes it
// (baseline SSE2): the per-entry tests then leave the gather loop.  Non-integers are found as
// (v + 2^m) - 2^m != v below 2^m (m = mantissa bits: adding 2^m rounds v to an integer).  A false
// "not clean" only costs speed (the checked loop runs), never correctness.
// (The body is always inlined: rank_gather_avx512.hpp compiles it once more for AVX-512.)
template <class IX, class DT>
__attribute__((always_inline)) inline bool range_is_clean(const IX* indices, const DT* data, i64 lo, i64 hi,
                                                          i64 n_cols, bool allow_non_integer) {
    using UX = std::make_unsigned_t<IX>;
    const UX limit = static_cast<UX>(std::min<i64>(n_cols, static_cast<i64>(std::numeric_limits<IX>::max())));
    const DT big = std::numeric_limits<DT>::digits == 24 ? DT(0x1p23) : DT(0x1p52);
    const DT inf = std::numeric_limits<DT>::infinity();
    unsigned bad = 0;
    if (allow_non_integer) {
        for (i64 k = lo; k < hi; ++k) {
            const DT v = data[k];
            bad |= static_cast<unsigned>(!(v >= 0)) | static_cast<unsigned>(v == inf);
        }
    } else {
        for (i64 k = lo; k < hi; ++k) {
            const DT v = data[k];
            const DT rounded = (v + big) - big;
            bad |= static_cast<unsigned>(!(v >= 0)) | static_cast<unsigned>(v == inf) |
                   (static_cast<unsigned>(v < big) & static_cast<unsigned>(rounded != v));
        }
    }
    for (i64 k = lo; k < hi; ++k) bad |= static_cast<unsigned>(static_cast<UX>(indices[k]) >= limit);
    return bad == 0;
}

// The per-token accumulator (0.0 = untouched, plus one sink slot), one per OS thread and kept
// all-zero between uses: the calling thread runs the first range of every chunk, so small chunks
// (e.g. one cell per call in a DataLoader worker) do not re-zero n_tokens doubles each time.
struct ZeroedAcc {
    std::vector<double> values;
    bool clean = true;  // false while in use, or after an exit that may have left values behind

    double* acquire(size_t n) {
        if (!clean || values.size() < n) values.assign(std::max(n, values.size()), 0.0);
        clean = false;
        return values.data();
    }
};

inline ZeroedAcc& thread_acc() {
    static thread_local ZeroedAcc acc;
    return acc;
}

// Per-call table for the direct gather: the median of each column's token (1.0 for unmapped
// columns, whose entries are never kept), so the key's divisor is loaded by column, in parallel
// with the token, instead of through it.  Empty when the direct gather is not used.
struct DirectTable {
    std::vector<double> col_median;
};

// Builds the table when col_token maps no two columns onto one token and the chunk has at least
// n_cols stored entries (building costs O(n_cols + n_tokens), at most ~one step per entry then).
template <class IP>
DirectTable direct_table(const IP* indptr, i64 n_cells, const RankConfig& cfg) {
    DirectTable t;
    const i64 nnz = static_cast<i64>(indptr[n_cells]) - static_cast<i64>(indptr[0]);
    if (nnz < cfg.n_cols || nnz < cfg.n_tokens) return t;
    std::vector<unsigned char> seen(static_cast<size_t>(cfg.n_tokens), 0);
    std::vector<double> col_median(static_cast<size_t>(cfg.n_cols), 1.0);
    for (i64 c = 0; c < cfg.n_cols; ++c) {
        const i32 tok = cfg.col_token[c];
        if (tok < 0) continue;
        if (seen[static_cast<size_t>(tok)]) return t;  // two columns on one token: accumulate
        seen[static_cast<size_t>(tok)] = 1;
        col_median[static_cast<size_t>(c)] = cfg.token_median[tok];
    }
    t.col_median = std::move(col_median);
    return t;
}

// A row's sequential count sums, taken by the direct gather while it reads the row anyway: `total`
// of every stored count (the cell total when none is given; the seed is set by the caller) and
// `matched` of those on vocabulary genes (for the match report's chunk sums, see ChunkSums).
struct RowSums {
    double total = 0.0;
    double matched = 0.0;
};

// Direct gather of a clean row [lo, hi) (see range_is_clean): fills cand with one candidate per
// stored entry of a mapped column with a nonzero count (raw orders, see CandidateWriter) and adds
// the counts into `sums` in stored order.  The two sums are dependency chains of their own, which the
// division and the candidate stores hide.  Returns false, with cand and sums to be discarded, when
// the column indices do not strictly increase (a column may repeat: the row needs the accumulated
// gather).
template <class IX, class DT>
bool gather_direct(const IX* indices, const DT* data, i64 lo, i64 hi, const i32* col_token,
                   const double* col_median, RowSums& sums, Candidates& cand) {
    CandidateWriter w(cand);
    i64 prev = -1;
    bool increasing = true;
    double total = sums.total, matched = sums.matched;
    for (i64 k = lo; k < hi; ++k) {
        const i64 col = static_cast<i64>(indices[k]);
        const double v = static_cast<double>(data[k]);
        total += v;
        increasing &= col > prev;
        prev = col;
        const i32 tok = col_token[col];
        matched += tok >= 0 ? v : 0.0;
        // v > 0 is v != 0 on a clean row (no NaN, no negative count) without the NaN-aware compare
        w.add(tok, v / col_median[col], (tok >= 0) & (v > 0));
    }
    w.finish(cand);
    sums.total = total;
    sums.matched = matched;
    return increasing;
}

// Key pass of the accumulated gather: one candidate per distinct touched token, resetting acc.
inline void keys_from_acc(const i32* touched, size_t n_touched, double* acc, const double* token_median,
                          Candidates& cand) {
    CandidateWriter w(cand);
    for (size_t r = 0; r < n_touched; ++r) {
        const i32 tok = touched[r];
        const double sum = acc[tok];
        acc[tok] = 0.0;  // a repeat of this token later in the list reads 0 and is dropped
        // Repeats and zero counts are dropped by testing the sum, not the key, so the next store
        // address never waits for the division.
        w.add(tok, sum / token_median[tok], sum != 0);
    }
    w.finish(cand);
}

// Accumulated gather of a clean row (see the checked loop in tokenize_range for the rules).
template <class IX, class DT>
size_t gather_acc(const IX* indices, const DT* data, i64 lo, i64 hi, const i32* col_token, double* acc,
                  size_t sink, bool sum_total, double& total, i32* touched) {
    size_t n_touched = 0;
    for (i64 k = lo; k < hi; ++k) {
        const double v = static_cast<double>(data[k]);
        if (sum_total) total += v;
        const i32 tok = col_token[indices[k]];
        const bool mapped = tok >= 0;
        touched[n_touched] = tok;
        n_touched += static_cast<size_t>(mapped);
        acc[mapped ? static_cast<size_t>(tok) : sink] += v;
    }
    return n_touched;
}

}  // namespace rank_detail
}  // namespace scfm
