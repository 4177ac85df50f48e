// Count sums of a chunk for the match report (the C++ twin of scfm_fast/tokenizer/_sums.py's Numba
// kernel): the total of every stored count and of those on vocabulary genes, each a sequential
// float64 sum in stored order, so both backends agree bit for bit.
#pragma once

#include "common.hpp"

namespace scfm {

struct CountSums {
    double total = 0.0;
    double matched = 0.0;
    i64 bad_entry = -1;  // first stored entry whose column is outside col_token (-1 when none)
};

template <class IX, class DT>
CountSums count_sums(const IX* indices, const DT* data, i64 n, const i32* col_token, i64 n_cols) {
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

}  // namespace scfm
