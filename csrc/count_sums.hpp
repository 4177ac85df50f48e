// Count sums of a chunk for the match report (the C++ twin of scfm_fast/tokenizer/_sums.py's Numba
// kernel): the total of every stored count and of those on vocabulary genes, each a sequential
// float64 sum in stored order, so both backends agree bit for bit.
#pragma once

#include <cmath>

#include "common.hpp"

namespace scfm {

struct CountSums {
    double total = 0.0;
    double matched = 0.0;
    i64 bad_entry = -1;  // first stored entry whose column is outside col_token (-1 when none)
};

// The sequential definition: one float64 add after another, in stored order.
template <class IX, class DT>
CountSums count_sums_sequential(const IX* indices, const DT* data, i64 n, const i32* col_token, i64 n_cols) {
    CountSums s;
    for (i64 k = 0; k < n; ++k) {
        const double v = static_cast<double>(data[k]);
        const i64 col = static_cast<i64>(indices[k]);
        if (col < 0 || col >= n_cols) {
            s.bad_entry = k;
            return s;
        }
        s.total += v;
        // branch-free: unmapped genes are frequent and unpredictable
        s.matched += col_token[col] >= 0 ? v : 0.0;
    }
    return s;
}

// The same sums, bit for bit, at several adds per cycle. Sequential float64 sums are bound by the add's
// latency (a dependency chain per entry, ~5% of a tokenize run). When every count is an integer and
// n * max|count| < 2^53, every partial sum in any order is an exact integer, so four interleaved
// accumulators give exactly the sequential result; anything else (fractional or non-finite counts, a
// bad column) takes the sequential loop.
template <class IX, class DT>
CountSums count_sums(const IX* indices, const DT* data, i64 n, const i32* col_token, i64 n_cols) {
    if (n_cols <= 0) return count_sums_sequential(indices, data, n, col_token, n_cols);
    constexpr double big = 0x1p52;
    double t[4] = {0.0, 0.0, 0.0, 0.0}, m[4] = {0.0, 0.0, 0.0, 0.0}, top = 0.0;
    unsigned bad = 0;
    const u64 limit = static_cast<u64>(n_cols);
    i64 k = 0;
    auto add = [&](int lane, i64 j) {
        const double v = static_cast<double>(data[j]);
        const u64 col = static_cast<u64>(static_cast<i64>(indices[j]));
        const bool ok_col = col < limit;
        bad |= static_cast<unsigned>(!ok_col);
        const double a = std::fabs(v);
        // not an integer (or NaN / inf): (a + 2^52) - 2^52 rounds a to an integer below 2^52
        bad |= static_cast<unsigned>(!(a < big)) | static_cast<unsigned>(((a + big) - big) != a);
        top = a > top ? a : top;
        t[lane] += v;
        m[lane] += (ok_col && col_token[ok_col ? col : 0] >= 0) ? v : 0.0;
    };
    for (; k + 4 <= n; k += 4) {
        add(0, k);
        add(1, k + 1);
        add(2, k + 2);
        add(3, k + 3);
    }
    for (; k < n; ++k) add(0, k);
    if (bad || top * static_cast<double>(n) >= big) return count_sums_sequential(indices, data, n, col_token, n_cols);
    CountSums s;
    s.total = ((t[0] + t[1]) + t[2]) + t[3];
    s.matched = ((m[0] + m[1]) + m[2]) + m[3];
    // an all-zero sum: the sequential one starts from +0.0, so a -0.0 count cannot make it -0.0 either
    if (s.total == 0.0) s.total = 0.0;
    if (s.matched == 0.0) s.matched = 0.0;
    return s;
}

}  // namespace scfm
