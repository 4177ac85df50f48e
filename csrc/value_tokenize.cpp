// GeneCompass values: per cell, re-sum each vocabulary token's counts into a dense per-thread
// accumulator (O(nnz), same sequential order as rank_tokenize), then value = log2(1 + key * factor)
// for the ranked tokens.  std::log2 is the C library's, as in the NumPy and Numba paths.
#include "value_tokenize.hpp"

#include <cmath>
#include <vector>

namespace scfm {

template <class IP, class IX, class DT>
i64 token_values(const CsrChunk<IP, IX, DT>& chunk, const ValueConfig& cfg, const i32* tokens,
                 const i64* offsets, float* values, int n_threads) {
    const i64 n_cells = chunk.n_cells;
    if (n_cells <= 0) return -1;
    const int n_parts = static_cast<int>(std::max<i64>(1, std::min<i64>(n_threads, n_cells)));
    const std::vector<i64> bounds = split_cells(chunk.indptr, n_cells, n_parts);
    std::vector<i64> bad(static_cast<size_t>(n_parts), -1);
    run_parts(n_parts, [&](int p) {
        // 0 marks "not in this row": a token of the output always has a positive sum
        std::vector<double> acc(static_cast<size_t>(cfg.n_tokens), 0.0);
        for (i64 i = bounds[p]; i < bounds[p + 1]; ++i) {
            const i64 lo = static_cast<i64>(chunk.indptr[i]);
            const i64 hi = static_cast<i64>(chunk.indptr[i + 1]);
            if (offsets[i + 1] == offsets[i]) continue;
            for (i64 k = lo; k < hi; ++k) {
                const i64 col = static_cast<i64>(chunk.indices[k]);
                if (col < 0 || col >= cfg.n_cols) {
                    bad[static_cast<size_t>(p)] = i;
                    return;
                }
                const i32 tok = cfg.col_token[col];
                const double v = static_cast<double>(chunk.data[k]);
                if (tok < 0 || v == 0) continue;
                acc[static_cast<size_t>(tok)] += v;  // 0.0 + v == v: sequential, seeded by the first value
            }
            const double factor = cfg.cell_factor != nullptr ? cfg.cell_factor[i] : 1.0;
            bool ok = true;
            for (i64 r = offsets[i]; r < offsets[i + 1]; ++r) {
                const i32 tok = tokens[r];
                if (tok < 0 || tok >= cfg.n_tokens || !(acc[static_cast<size_t>(tok)] > 0)) {
                    ok = false;
                    continue;
                }
                const double key = acc[static_cast<size_t>(tok)] / cfg.token_median[tok];
                values[r] = static_cast<float>(std::log2(1.0 + key * factor));
            }
            for (i64 k = lo; k < hi; ++k) {  // reset only what this row touched
                const i32 tok = cfg.col_token[static_cast<i64>(chunk.indices[k])];
                if (tok >= 0) acc[static_cast<size_t>(tok)] = 0.0;
            }
            if (!ok) {
                bad[static_cast<size_t>(p)] = i;
                return;
            }
        }
    });
    for (i64 b : bad)
        if (b >= 0) return b;
    return -1;
}

#define SCFM_INSTANTIATE(IP, IX, DT)                                                             \
    template i64 token_values<IP, IX, DT>(const CsrChunk<IP, IX, DT>&, const ValueConfig&, const i32*, \
                                          const i64*, float*, int);
SCFM_CSR_LAYOUTS(SCFM_INSTANTIATE)
#undef SCFM_INSTANTIATE

}  // namespace scfm
