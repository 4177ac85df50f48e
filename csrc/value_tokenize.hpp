// GeneCompass values of already-ranked tokens (the C++ twin of the value step of
// scfm_fast/tokenizer/reference.py::value_tokenize_ref, whose docstring defines the semantics).
// The token order itself comes from rank_tokenize (same key, same tie rule, no special tokens).
#pragma once

#include "common.hpp"

namespace scfm {

struct ValueConfig {
    const i32* col_token = nullptr;        // token id per source column, -1 = not in the vocabulary
    i64 n_cols = 0;
    const double* token_median = nullptr;  // gene median per token id
    i64 n_tokens = 0;
    const double* cell_factor = nullptr;   // per-cell factor on the key (T / total), or nullptr for 1
};

// values[t] = float32(log2(1 + sum / median * factor)) for every token t of every cell, where sum is
// the cell's sequential float64 sum of that token's counts in stored order.  `tokens` / `offsets`
// must come from rank_tokenize on the same chunk (every token of cell i is in row i).  Returns the
// first cell whose token is not in its row or whose column index is out of range (-1 when none):
// inputs that did not come from rank_tokenize are refused, not read out of bounds.
template <class IP, class IX, class DT>
i64 token_values(const CsrChunk<IP, IX, DT>& chunk, const ValueConfig& cfg, const i32* tokens,
                 const i64* offsets, float* values, int n_threads);

}  // namespace scfm
