// Rank-value tokenization core.  Per cell: validate counts, total (sequential float64 sum in stored
// order), one (order, token) candidate per expressed vocabulary gene, order by (key desc, token asc),
// truncate, add <cls>/<eos>.  A vectorized pass checks each row's counts and columns just before its
// gather (range_is_clean); only a row with bad input takes the checked loop, which finds the error
// to report.  Candidates come from one of two gathers:
//  * direct (the common case): when col_token is injective over mapped columns and a row's column
//    indices strictly increase, every stored entry is its own gene, so its key is count / median
//    straight from the entry (no per-token read-modify-write);
//  * accumulated: otherwise (two columns on one token, repeated or unsorted indices, chunks too small
//    to pay for the per-call column table) entries of one token are summed in a dense per-thread
//    accumulator + touched list (O(nnz), no hashing).
// Both give bit-identical keys: a lone entry's sum is 0.0 + v == v for every nonzero v.
#include "rank_tokenize.hpp"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>

#include "rank_gather.hpp"
#include "rank_gather_avx512.hpp"
#include "rank_sort.hpp"

namespace scfm {
namespace {

using namespace rank_detail;

bool cpu_simd() {
#ifdef SCFM_HAVE_AVX512_GATHER
    return cpu_has_avx512_gather();
#else
    return false;
#endif
}

// SCFM_FAST_SIMD=0 turns the AVX-512 gather off for the process (A/B runs, suspected CPU issues)
bool simd_at_load() {
    const char* env = std::getenv("SCFM_FAST_SIMD");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    return cpu_simd();
}

std::atomic<bool> g_simd{simd_at_load()};

// The direct gather of a clean row: the AVX-512 twin where it applies (see rank_gather_avx512.hpp).
template <class IX, class DT>
bool gather_row(bool simd, const IX* indices, const DT* data, i64 lo, i64 hi, const i32* col_token,
                const double* col_median, RowSums& sums, Candidates& cand) {
#ifdef SCFM_HAVE_AVX512_GATHER
    if constexpr (std::is_same_v<IX, i32>) {
        if (simd) return gather_direct_avx512(indices, data, lo, hi, col_token, col_median, sums, cand);
    }
#endif
    (void)simd;
    return gather_direct(indices, data, lo, hi, col_token, col_median, sums, cand);
}

template <class IX, class DT>
bool row_is_clean(bool simd, const IX* indices, const DT* data, i64 lo, i64 hi, i64 n_cols, bool allow_non_integer) {
#ifdef SCFM_HAVE_AVX512_GATHER
    if (simd) return range_is_clean_avx512(indices, data, lo, hi, n_cols, allow_non_integer);
#endif
    (void)simd;
    return range_is_clean(indices, data, lo, hi, n_cols, allow_non_integer);
}

struct ThreadState {
    std::vector<i32> touched;  // accumulated gather: tokens with acc != 0, in first-seen order
    Candidates cand;           // (order, token) candidates of the current cell
    SortScratch sort;          // radix_rank's buffers
    i64 n_written = 0;         // tokens written at this range's start in the output buffer
    ChunkSums sums{0.0, 0.0, true};  // this range's count sums (exact while every row adds its own)
    CellError error;
};

template <class IP, class IX, class DT>
void tokenize_range(const CsrChunk<IP, IX, DT>& chunk, const RankConfig& cfg, const DirectTable& table,
                    i64 c0, i64 c1, ThreadState& st, i32* out, i64* lengths, double* cell_totals) {
    const i64 n_special = (cfg.cls_token >= 0 ? 1 : 0) + (cfg.eos_token >= 0 ? 1 : 0);
    i64 longest = 0;
    for (i64 i = c0; i < c1; ++i) {
        longest = std::max(longest, static_cast<i64>(chunk.indptr[i + 1]) - static_cast<i64>(chunk.indptr[i]));
    }
    // Scratch sized once per range: nothing is allocated per cell.
    st.touched.resize(static_cast<size_t>(longest));
    st.cand.reserve(static_cast<size_t>(longest));
    i32* const touched = st.touched.data();
    ZeroedAcc& zeroed = thread_acc();
    const size_t sink = static_cast<size_t>(cfg.n_tokens);
    double* const acc = zeroed.acquire(sink + 1);
    i32* w = out;
    const bool have_table = !table.col_median.empty();
    bool producing = true;  // false once a bad index was seen: only count validation continues
    const bool given = cfg.totals != nullptr;
    const bool simd_check = g_simd.load(std::memory_order_relaxed);
    // the lane-wise row sums of the AVX-512 gather are exact for integer counts only
    const bool simd = simd_check && !cfg.allow_non_integer;

    for (i64 i = c0; i < c1; ++i) {
        const i64 lo = static_cast<i64>(chunk.indptr[i]);
        const i64 hi = static_cast<i64>(chunk.indptr[i + 1]);
        // Row total: the given one, or a sequential sum.  Seeding the sum with -0.0 (the exact
        // additive identity: -0.0 + x == x for every x, +0.0 included) equals seeding it with the
        // first value, which is the oracle's definition; an empty row sums to +0.0.
        const double sum_seed = hi > lo ? -0.0 : 0.0;
        double total = given ? cfg.totals[i] : sum_seed;
        const bool wanted = !given || total > 0;  // a cell with a given total <= 0 gets no tokens
        // Checked per row, right before its gather, so the row is read from DRAM once and the gather
        // finds it in L1 (a check of the whole range first would stream it twice).  A clean row holds
        // no error, so skipping the checked loop for it cannot change which error is reported; a row
        // that is not clean takes the checked loop, and after a bad index every row only validates.
        const bool clean = wanted && producing &&
                           row_is_clean(simd_check, chunk.indices, chunk.data, lo, hi, cfg.n_cols, cfg.allow_non_integer);
        size_t n_touched = 0;
        bool have_cand = false;  // candidates came from the direct gather (else from acc)
        i64 k = lo;
        if (clean && have_table) {
            RowSums row{sum_seed, 0.0};
            have_cand = gather_row(simd, chunk.indices, chunk.data, lo, hi, cfg.col_token, table.col_median.data(),
                                   row, st.cand);
            if (have_cand) {
                if (!given) total = row.total;
                // Clean rows of integer counts: the row sums are exact integers (see ChunkSums)
                st.sums.total += row.total;
                st.sums.matched += row.matched;
            }
        }
        st.sums.exact &= have_cand && !cfg.allow_non_integer;  // any other row: the caller sums the chunk
        if (clean) {
            if (!have_cand) {
                n_touched = gather_acc(chunk.indices, chunk.data, lo, hi, cfg.col_token, acc, sink, !given,
                                       total, touched);
            }
            k = hi;
        } else if (wanted && producing) {
            // checked loop: validate, sum, gather (the loop-invariant `given` / `allow_non_integer`
            // tests are unswitched by the compiler)
            for (; k < hi; ++k) {
                const double v = static_cast<double>(chunk.data[k]);
                if (bad_count(v, cfg.allow_non_integer)) {
                    st.error.merge(CellError{ErrorKind::bad_count, i, k, -1});
                    return;  // later entries cannot be reported before this one (acc left dirty)
                }
                if (!given) total += v;
                const i64 col = static_cast<i64>(chunk.indices[k]);
                if (col < 0 || col >= cfg.n_cols) {
                    st.error.merge(CellError{ErrorKind::bad_index, i, k, col});
                    producing = false;  // keep scanning below: a later bad count takes precedence
                    ++k;
                    break;
                }
                // Branch-free (unmapped genes are frequent and unpredictable): unmapped columns add
                // into a sink slot past the last token, which is never read back.  Every mapped
                // entry is listed in `touched` (its slot depends only on col_token, not on the
                // accumulator, so the next store address never waits for a random load); the key
                // pass drops repeats and zero sums.  0.0 + v == v, so acc holds the sequential sum
                // seeded by the first value, as in the oracle.
                const i32 tok = cfg.col_token[col];
                const bool mapped = tok >= 0;
                touched[n_touched] = tok;
                n_touched += static_cast<size_t>(mapped);
                acc[mapped ? static_cast<size_t>(tok) : sink] += v;
            }
        }
        // validation only: the rest of a row after a bad index, or a row that is not tokenized
        for (; k < hi; ++k) {
            const double v = static_cast<double>(chunk.data[k]);
            if (bad_count(v, cfg.allow_non_integer)) {
                st.error.merge(CellError{ErrorKind::bad_count, i, k, -1});
                return;
            }
            if (!given) total += v;
            if (!producing) continue;
            const i64 col = static_cast<i64>(chunk.indices[k]);
            if (col < 0 || col >= cfg.n_cols) {
                st.error.merge(CellError{ErrorKind::bad_index, i, k, col});
                producing = false;
            }
        }
        cell_totals[i] = total;
        lengths[i] = 0;
        if (!producing) {
            for (size_t r = 0; r < n_touched; ++r) acc[touched[r]] = 0.0;
            continue;
        }
        if (!(total > 0)) continue;  // also catches a NaN total; nothing was gathered then
        if (!have_cand) keys_from_acc(touched, n_touched, acc, cfg.token_median, st.cand);
        if (st.cand.odd_keys) st.cand.fix_odd_keys();
        if (st.cand.n == 0) continue;
        const i64 keep = std::min(static_cast<i64>(st.cand.n), cfg.budget);
        if (cfg.cls_token >= 0) *w++ = cfg.cls_token;
        radix_rank(st.cand, keep, st.sort, w);
        w += keep;
        if (cfg.eos_token >= 0) *w++ = cfg.eos_token;
        lengths[i] = keep + n_special;
    }
    st.n_written = w - out;
    acc[sink] = 0.0;  // every touched slot was reset per cell; the sink is the only dirty one
    zeroed.clean = true;
}

}  // namespace

bool gather_simd_active() { return g_simd.load(); }

bool set_gather_simd(bool enabled) {
    const bool on = enabled && cpu_simd();
    g_simd.store(on);
    return on;
}

i64 find_bad_col_token(const i32* col_token, i64 n_cols, i64 n_tokens) {
    for (i64 c = 0; c < n_cols; ++c) {
        if (col_token[c] >= n_tokens) return c;  // any negative id means "not in the vocabulary"
    }
    return -1;
}

namespace {

// The one released token buffer kept for reuse (see release_token_buffer); an atomic exchange, so
// neither a lock nor its state after fork() is involved.
std::atomic<void*> g_spare_tokens{nullptr};

// A buffer for n tokens: the kept one resized (realloc keeps its resident pages: glibc moves or
// trims a large mmap-ed block with mremap, no copy and no new faults but for a larger tail), else
// a fresh malloc().
i32* acquire_token_buffer(i64 n) {
    const size_t bytes = static_cast<size_t>(n) * sizeof(i32);
    if (void* spare = g_spare_tokens.exchange(nullptr)) {
        if (void* p = std::realloc(spare, bytes)) return static_cast<i32*>(p);
        std::free(spare);
    }
    return static_cast<i32*>(std::malloc(bytes));
}

}  // namespace

void release_token_buffer(i32* tokens) noexcept {
    if (tokens == nullptr) return;
    std::free(g_spare_tokens.exchange(tokens));
}

RankResult& RankResult::operator=(RankResult&& o) noexcept {
    if (this != &o) {
        if (!external) release_token_buffer(tokens);
        tokens = o.tokens;
        n_tokens = o.n_tokens;
        error = o.error;
        external = o.external;
        sums = o.sums;
        o.tokens = nullptr;
    }
    return *this;
}

RankResult::~RankResult() {
    if (!external) release_token_buffer(tokens);
}

template <class IP, class IX, class DT>
RankResult rank_tokenize(const CsrChunk<IP, IX, DT>& chunk, const RankConfig& cfg, int n_threads,
                         i64* offsets, double* cell_totals, i32* out, i64 out_capacity) {
    RankResult result;
    const i64 n_cells = chunk.n_cells;
    offsets[0] = 0;
    if (n_cells <= 0) return result;
    const int n_parts = static_cast<int>(std::max<i64>(1, std::min<i64>(n_threads, n_cells)));
    const std::vector<i64> bounds = split_cells(chunk.indptr, n_cells, n_parts);

    // One output buffer, each range writing from the start of its upper-bound slot (a cell emits at
    // most min(nnz, budget) genes plus the specials); ranges are then slid left to be contiguous.
    // This avoids per-thread buffers and a second full copy of the output.
    const i64 n_special = (cfg.cls_token >= 0 ? 1 : 0) + (cfg.eos_token >= 0 ? 1 : 0);
    std::vector<i64> slot(static_cast<size_t>(n_parts) + 1, 0);
    for (int p = 0; p < n_parts; ++p) {
        i64 bound = 0;
        for (i64 i = bounds[p]; i < bounds[p + 1]; ++i) {
            const i64 nnz = static_cast<i64>(chunk.indptr[i + 1]) - static_cast<i64>(chunk.indptr[i]);
            if (nnz > 0) bound += std::min(nnz, cfg.budget) + n_special;
        }
        slot[p + 1] = slot[p] + bound;
    }
    i32* buffer = nullptr;
    if (out != nullptr && out_capacity >= slot[n_parts]) {
        buffer = out;
        result.external = true;
    } else if (slot[n_parts] > 0) {
        buffer = acquire_token_buffer(slot[n_parts]);
        if (buffer == nullptr) throw std::bad_alloc();
    }
    result.tokens = buffer;  // owned (freed) by result from here on, unless external

    const DirectTable table = direct_table(chunk.indptr, n_cells, cfg);
    std::vector<ThreadState> states(static_cast<size_t>(n_parts));
    i64* lengths = offsets + 1;  // lengths first, prefix-summed in place below
    run_parts(n_parts, [&](int p) {
        ThreadState& st = states[static_cast<size_t>(p)];
        tokenize_range(chunk, cfg, table, bounds[p], bounds[p + 1], st, buffer + slot[p], lengths, cell_totals);
        st.cand = Candidates();
        st.sort = SortScratch();
    });
    result.sums = ChunkSums{0.0, 0.0, true};
    for (auto& st : states) {
        result.error.merge(st.error);
        result.sums.total += st.sums.total;
        result.sums.matched += st.sums.matched;
        result.sums.exact &= st.sums.exact;
    }
    // Below 2^53 every partial sum of these non-negative integers was exact (an inexact add rounds a
    // sum above 2^53, and sums only grow from there)
    result.sums.exact &= result.sums.total < 0x1p53;
    if (!result.error.ok()) {
        result.drop();
        return result;
    }
    for (i64 i = 0; i < n_cells; ++i) offsets[i + 1] += offsets[i];
    result.n_tokens = offsets[n_cells];
    // Slide ranges left in order (each destination lies at or before its source, and after every
    // earlier range's final place, so in-order memmove is safe).
    for (int p = 1; p < n_parts; ++p) {
        const i64 dst = offsets[bounds[p]];
        const i64 n = states[static_cast<size_t>(p)].n_written;
        if (n > 0 && dst != slot[p]) std::memmove(buffer + dst, buffer + slot[p], static_cast<size_t>(n) * sizeof(i32));
    }
    if (result.n_tokens == 0) {
        result.drop();
    } else if (!result.external && result.n_tokens < slot[n_parts]) {
        // give the unused tail back (glibc shrinks large mmap-ed blocks in place)
        void* shrunk = std::realloc(buffer, static_cast<size_t>(result.n_tokens) * sizeof(i32));
        if (shrunk != nullptr) result.tokens = static_cast<i32*>(shrunk);
    }
    return result;
}

#define SCFM_INSTANTIATE(IP, IX, DT)                                                              \
    template RankResult rank_tokenize<IP, IX, DT>(const CsrChunk<IP, IX, DT>&, const RankConfig&, \
                                                  int, i64*, double*, i32*, i64);
SCFM_CSR_LAYOUTS(SCFM_INSTANTIATE)
#undef SCFM_INSTANTIATE

}  // namespace scfm
