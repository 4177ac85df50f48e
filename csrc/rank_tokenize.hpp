// Geneformer rank-value tokenization of a CSR chunk of cells (the C++ twin of
// scfm_fast/tokenizer/reference.py::rank_tokenize_ref, whose docstring defines the semantics).
#pragma once

#include <cstdlib>
#include <vector>

#include "common.hpp"

namespace scfm {

struct RankConfig {
    const i32* col_token = nullptr;  // token id per source column, -1 = not in the vocabulary
    i64 n_cols = 0;
    const double* token_median = nullptr;  // gene median per token id
    i64 n_tokens = 0;                      // length of token_median; every col_token < n_tokens
    const double* totals = nullptr;        // per-cell totals, or nullptr to sum each row
    i64 budget = 1;                        // genes kept per cell (max_len minus special tokens)
    i32 cls_token = -1;                    // prepended when >= 0
    i32 eos_token = -1;                    // appended when >= 0
    bool allow_non_integer = false;
};

// The match report's count sums of a chunk (total of all stored counts, and of those on vocabulary
// genes), taken in the rank pass instead of a second pass over the chunk (count_sums.hpp).  `exact`
// when they equal count_sums' sequential sums bit for bit: every row went through the direct gather
// with integer counts (range_is_clean without allow_non_integer), so every row sum, and every sum of
// row sums below 2^53, is an exact integer whatever the order.  Covers the rows [0, n_cells) only:
// equal to count_sums of the arrays when indptr spans them.
struct ChunkSums {
    double total = 0.0;
    double matched = 0.0;
    bool exact = false;
};

// Gives a token buffer of a RankResult back (nullptr is fine): it is kept for the next call's output
// (its pages are already faulted in and zeroed, which costs ~0.06-0.08 CPU s per 20,000 PBMC cells
// for a fresh one), and the buffer kept before it is freed.  Thread-safe; at most one is kept.
void release_token_buffer(i32* tokens) noexcept;

// Tokens of one chunk, concatenated in cell order in a malloc()-ed buffer whose ownership the
// caller takes (bindings hand it to NumPy without a copy, with release_token_buffer as its deleter).
struct RankResult {
    i32* tokens = nullptr;  // n_tokens entries (may be nullptr when n_tokens == 0)
    i64 n_tokens = 0;
    CellError error;        // first bad input in CSR order (ok() when none; then tokens is nullptr)
    bool external = false;  // tokens points into the caller's buffer: not freed here
    ChunkSums sums;         // the chunk's count sums, when exact

    RankResult() = default;
    RankResult(const RankResult&) = delete;
    RankResult& operator=(const RankResult&) = delete;
    RankResult(RankResult&& o) noexcept
        : tokens(o.tokens), n_tokens(o.n_tokens), error(o.error), external(o.external), sums(o.sums) {
        o.tokens = nullptr;
    }
    RankResult& operator=(RankResult&& o) noexcept;
    ~RankResult();
    // Forget the tokens (freeing them unless external).
    void drop() {
        if (!external) release_token_buffer(tokens);
        tokens = nullptr;
        external = false;
    }
    // Give up ownership of the buffer (the caller must pass it to release_token_buffer() unless
    // external).
    i32* release() {
        i32* t = tokens;
        tokens = nullptr;
        return t;
    }
};

// Whether clean rows of int32 column indices and integer counts take the AVX-512 direct gather
// (rank_gather_avx512.hpp): on by default where the CPU has AVX-512 F/DQ/VL/BW, off with
// SCFM_FAST_SIMD=0 in the environment at load.  set_gather_simd turns it on (where the CPU allows)
// or off for every later call and returns whether it is on; tokens are the same either way.
bool gather_simd_active();
bool set_gather_simd(bool enabled);

// Index of the first col_token entry that is >= n_tokens, or -1 when all are valid.
i64 find_bad_col_token(const i32* col_token, i64 n_cols, i64 n_tokens);

// Tokenize cells [0, chunk.n_cells) with up to n_threads threads.  Writes offsets[0..n_cells]
// (offsets[0] = 0) and cell_totals[0..n_cells).  When result.error is set, nothing else of the
// result is meaningful.  Throws std::bad_alloc when the output cannot be allocated.
// out / out_capacity: a caller-owned buffer of out_capacity int32s; used (result.external, tokens
// == out) when it holds the chunk's upper bound (rank_output_bound), else the buffer released last
// is resized for it (or a fresh one malloc()-ed).
// Reusing one buffer across calls saves the kernel's page faults and zeroing of fresh memory.
template <class IP, class IX, class DT>
RankResult rank_tokenize(const CsrChunk<IP, IX, DT>& chunk, const RankConfig& cfg, int n_threads,
                         i64* offsets, double* cell_totals, i32* out = nullptr, i64 out_capacity = 0);

}  // namespace scfm
