// AVX-512 twin of rank_detail::gather_direct (rank_gather.hpp) for int32 column indices and integer
// counts, and range_is_clean compiled for AVX-512, chosen at run time (gather_simd_active) on CPUs
// that have it.  Included by
// rank_tokenize.cpp only; the rest of the build stays baseline x86-64.
//
// Why: the scalar gather costs ~8-11 cycles per stored entry (two dependent float64 sums, one
// divsd, the branch-free candidate append).  Eight entries per step: gathered tokens and medians,
// one vdivpd, the same monotone order map, and compress-stores of the kept (order, token) pairs, in
// stored order.  Every candidate, and lo / hi, is bit-identical to the scalar gather's: the division
// is the same IEEE operation and compress keeps the order.  The row sums are taken in eight lanes,
// which equals the sequential sum only for integer counts whose partial sums stay below 2^53 (every
// such sum is exact in any order); the caller only comes here without allow_non_integer, and a row
// whose sum reaches 2^52 is redone by the scalar gather.
#pragma once

#include <type_traits>

#include "rank_gather.hpp"

#if defined(__GNUC__) && defined(__x86_64__)
// GCC 12 warns about the deliberately undefined vectors in its own AVX-512 reduction intrinsics
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#define SCFM_HAVE_AVX512_GATHER 1
#define SCFM_AVX512 __attribute__((target("avx2,avx512f,avx512dq,avx512vl,avx512bw")))

namespace scfm {
namespace rank_detail {

// True when this CPU runs the AVX-512 gather (F, DQ, VL, BW).
inline bool cpu_has_avx512_gather() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx2");
}

template <class DT>
SCFM_AVX512 inline __m512d load_counts(const DT* p, __mmask8 m) {
    if constexpr (std::is_same_v<DT, float>) {
        return _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, p));  // float -> double is exact
    } else {
        return _mm512_maskz_loadu_pd(m, p);
    }
}

// range_is_clean compiled for AVX-512 (16 floats per step instead of SSE2's 4).
template <class IX, class DT>
SCFM_AVX512 bool range_is_clean_avx512(const IX* indices, const DT* data, i64 lo, i64 hi, i64 n_cols,
                                       bool allow_non_integer) {
    return range_is_clean(indices, data, lo, hi, n_cols, allow_non_integer);
}

// Same contract as gather_direct for a clean row of integer counts (see the file comment): cand
// reserved for the row (Candidates::reserve keeps the spare slots past it that whole-vector stores use).
template <class DT>
SCFM_AVX512 bool gather_direct_avx512(const i32* indices, const DT* data, i64 lo, i64 hi, const i32* col_token,
                                      const double* col_median, RowSums& sums, Candidates& cand) {
    u64* const orders = cand.orders.data();
    i32* const tokens = cand.tokens.data();
    size_t n = 0;
    const __m512i ones = _mm512_set1_epi64(-1);
    __m512i lo_v = ones;                      // unsigned min of kept orders (~0 when none)
    __m512i hi_v = _mm512_setzero_si512();    // unsigned max
    __m512d total_v = _mm512_set1_pd(-0.0);   // -0.0: the identity, as the scalar seed
    __m512d matched_v = _mm512_setzero_pd();  // +0.0, as the scalar one
    const __m512d zero = _mm512_setzero_pd();
    const __m256i no_token = _mm256_setzero_si256();
    __mmask8 ordered = 0xff;
    for (i64 k = lo; k < hi; k += 8) {
        const i64 left = hi - k;
        const __mmask8 m = left >= 8 ? __mmask8(0xff) : static_cast<__mmask8>((1u << left) - 1u);
        const __m256i col = _mm256_maskz_loadu_epi32(m, indices + k);
        // previous column per lane: -1 before the row's first entry (masked-off lanes are not read,
        // so nothing outside [lo, hi) is touched)
        const __mmask8 from = k == lo ? static_cast<__mmask8>(m & 0xfe) : m;
        const __m256i prev = _mm256_mask_loadu_epi32(_mm256_set1_epi32(-1), from, indices + k - 1);
        ordered &= static_cast<__mmask8>(_mm256_cmpgt_epi32_mask(col, prev) | ~m);
        const __m256i tok = _mm256_mmask_i32gather_epi32(no_token, m, col, col_token, 4);
        const __m512d med = _mm512_mask_i32gather_pd(_mm512_set1_pd(1.0), m, col, col_median, 8);
        const __m512d v = load_counts(data + k, m);
        total_v = _mm512_mask_add_pd(total_v, m, total_v, v);
        const __mmask8 mapped = _mm256_mask_cmpge_epi32_mask(m, tok, no_token);
        matched_v = _mm512_mask_add_pd(matched_v, mapped, matched_v, v);
        const __mmask8 kept = _mm512_mask_cmp_pd_mask(mapped, v, zero, _CMP_GT_OQ);
        // raw_order: bits ^ (~sign_fill >> 1)
        const __m512i bits = _mm512_castpd_si512(_mm512_div_pd(v, med));
        const __m512i neg = _mm512_srai_epi64(bits, 63);
        const __m512i order = _mm512_xor_si512(bits, _mm512_srli_epi64(_mm512_andnot_si512(neg, ones), 1));
        lo_v = _mm512_mask_min_epu64(lo_v, kept, lo_v, order);
        hi_v = _mm512_mask_max_epu64(hi_v, kept, hi_v, order);
        // compressed in registers and stored whole (lanes past the kept ones are overwritten by the
        // next step or land in the spare slots): compress-to-memory is microcoded and slow on some
        // CPUs (AMD Zen 4)
        _mm512_storeu_si512(orders + n, _mm512_maskz_compress_epi64(kept, order));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(tokens + n), _mm256_maskz_compress_epi32(kept, tok));
        n += static_cast<size_t>(__builtin_popcount(static_cast<unsigned>(kept)));
    }
    const double total = sums.total + _mm512_reduce_add_pd(total_v);
    if (!(total < 0x1p52)) {  // sums this large may round: take them in stored order
        return gather_direct(indices, data, lo, hi, col_token, col_median, sums, cand);
    }
    sums.total = total;
    sums.matched += _mm512_reduce_add_pd(matched_v);
    cand.found(n, _mm512_reduce_min_epu64(lo_v), _mm512_reduce_max_epu64(hi_v));
    return ordered == 0xff;
}

}  // namespace rank_detail
}  // namespace scfm

#undef SCFM_AVX512
#pragma GCC diagnostic pop
#endif
