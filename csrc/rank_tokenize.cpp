// Rank-value tokenization core.  Per cell: validate counts, total (sequential float64 sum in stored
// order), sum duplicate tokens (dense per-thread accumulator + touched list: O(nnz), no hashing),
// key = sum / median, order by (key desc, token asc), truncate, add <cls>/<eos>.
#include "rank_tokenize.hpp"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

namespace scfm {
namespace {

// One ranked candidate.  `order` is the key mapped to an unsigned integer whose *ascending* order is
// the key's *descending* order, with NaN last (as NumPy's lexsort on -key puts NaN last); equal keys
// map to equal integers.  (order, token) is then a strict total order, so sort, nth_element and any
// thread split all give the same tokens.
struct Item {
    u64 order;
    i32 token;
};

inline bool item_less(const Item& a, const Item& b) {
    return a.order < b.order || (a.order == b.order && a.token < b.token);
}

inline u64 descending_order(double key) {
    if (std::isnan(key)) return ~u64{0};
    u64 bits;
    std::memcpy(&bits, &key, sizeof bits);
    constexpr u64 sign = u64{1} << 63;
    // Standard monotone map of IEEE doubles onto unsigned integers, then inverted for descending.
    // Zero keys never get here (they are dropped), so -0.0 / +0.0 need no care.
    const u64 ascending = (bits & sign) ? ~bits : (bits | sign);
    return ~ascending;
}

// Counts must be finite, >= 0, and integers unless allowed; same tests as check_counts_ref.
inline bool bad_count(double v, bool allow_non_integer) {
    if (!std::isfinite(v) || v < 0) return true;
    if (allow_non_integer) return false;
    // v != floor(v) without a libm call (baseline x86-64 has no SSE4.1 round): every double of
    // magnitude >= 2**52 is an integer, and below that the int64 round trip is exact.
    return v < 0x1p52 && v != static_cast<double>(static_cast<i64>(v));
}

// Orders items[0, n) so that its first `keep` entries are the `keep` smallest by item_less, sorted.
// A bucket sort on the order value: the map order -> bucket is monotone, so after one histogram
// pass and one scatter pass the items are sorted except inside buckets, and one insertion-sort pass
// finishes the job in O(n + inversions).  Keys of a cell are counts / medians, spread over a few
// binades in bit space, so with n..2n buckets the buckets hold ~1-2 items.  If a bucket is crowded
// (skewed keys), fall back to introsort so the worst case stays O(n log n).  Exactness only needs
// the bucket map to be monotone; all comparisons use the full (order, token) order.
void bucket_rank(std::vector<Item>& items, std::vector<Item>& spare, std::vector<i32>& counts, i64 keep) {
    const size_t n = items.size();
    auto introsort = [&]() {
        if (static_cast<i64>(n) > keep) {
            std::nth_element(items.begin(), items.begin() + keep, items.end(), item_less);
        }
        std::sort(items.begin(), items.begin() + keep, item_less);
    };
    if (n < 64) return introsort();
    u64 lo = items[0].order, hi = items[0].order;
    for (const Item& it : items) {
        lo = std::min(lo, it.order);
        hi = std::max(hi, it.order);
    }
    const u64 range = hi - lo;
    int want_bits = 1;
    while ((size_t{1} << want_bits) < 2 * n) ++want_bits;
    int range_bits = 0;
    while (range_bits < 64 && (range >> range_bits) != 0) ++range_bits;
    const int shift = std::max(0, range_bits - want_bits);
    const size_t n_buckets = static_cast<size_t>(range >> shift) + 1;
    counts.assign(n_buckets + 1, 0);
    i32* const c = counts.data();
    for (const Item& it : items) ++c[((it.order - lo) >> shift) + 1];
    i32 crowded = 0;
    for (size_t b = 1; b <= n_buckets; ++b) {
        crowded = std::max(crowded, c[b]);
        c[b] += c[b - 1];  // c[b] = start of bucket b
    }
    if (crowded > 48) return introsort();
    spare.resize(n);
    Item* const out = spare.data();
    for (const Item& it : items) out[c[(it.order - lo) >> shift]++] = it;
    for (size_t i = 1; i < n; ++i) {  // insertion sort: only in-bucket inversions remain
        if (!item_less(out[i], out[i - 1])) continue;
        const Item x = out[i];
        size_t j = i;
        do {
            out[j] = out[j - 1];
            --j;
        } while (j > 0 && item_less(x, out[j - 1]));
        out[j] = x;
    }
    items.swap(spare);
}

struct ThreadState {
    std::vector<double> acc;     // per-token running sum, 0.0 = untouched (all summed values are > 0)
    std::vector<i32> touched;    // tokens with acc != 0, in first-seen (column) order
    std::vector<Item> items;     // ranking scratch
    std::vector<Item> spare;     // bucket sort target
    std::vector<i32> counts;     // bucket sort histogram
    i64 n_written = 0;           // tokens written at this range's start in the output buffer
    CellError error;
};

template <class IP, class IX, class DT>
void tokenize_range(const CsrChunk<IP, IX, DT>& chunk, const RankConfig& cfg, i64 c0, i64 c1,
                    ThreadState& st, i32* out, i64* lengths, double* cell_totals) {
    const i64 n_special = (cfg.cls_token >= 0 ? 1 : 0) + (cfg.eos_token >= 0 ? 1 : 0);
    i64 longest = 0;
    for (i64 i = c0; i < c1; ++i) {
        longest = std::max(longest, static_cast<i64>(chunk.indptr[i + 1]) - static_cast<i64>(chunk.indptr[i]));
    }
    // Scratch sized once per range: nothing is allocated per cell.
    st.acc.assign(static_cast<size_t>(cfg.n_tokens), 0.0);
    st.touched.resize(static_cast<size_t>(longest));
    i32* const touched = st.touched.data();
    double* const acc = st.acc.data();
    i32* w = out;
    bool producing = true;  // false once a bad index was seen: only count validation continues

    for (i64 i = c0; i < c1; ++i) {
        const i64 lo = static_cast<i64>(chunk.indptr[i]);
        const i64 hi = static_cast<i64>(chunk.indptr[i + 1]);
        const bool given = cfg.totals != nullptr;
        double total = given ? cfg.totals[i] : 0.0;
        const bool gather = producing && (!given || total > 0);
        size_t n_touched = 0;
        for (i64 k = lo; k < hi; ++k) {
            const double v = static_cast<double>(chunk.data[k]);
            if (bad_count(v, cfg.allow_non_integer)) {
                st.error.merge(CellError{ErrorKind::bad_count, i, k, -1});
                return;  // later entries of this range cannot be reported before this one
            }
            if (!given) total = (k == lo) ? v : total + v;  // sequential, seeded by the first value
            if (!producing) continue;
            const i64 col = static_cast<i64>(chunk.indices[k]);
            if (col < 0 || col >= cfg.n_cols) {
                st.error.merge(CellError{ErrorKind::bad_index, i, k, col});
                producing = false;  // keep scanning: a later bad count still takes precedence
                continue;
            }
            if (!gather || v == 0) continue;
            const i32 tok = cfg.col_token[col];
            if (tok < 0) continue;
            double& a = acc[tok];
            if (a == 0.0) touched[n_touched++] = tok;
            a += v;  // 0.0 + v == v exactly, so this is the sequential sum seeded by the first value
        }
        cell_totals[i] = total;
        lengths[i] = 0;
        if (!producing) {
            for (size_t r = 0; r < n_touched; ++r) acc[touched[r]] = 0.0;
            continue;
        }
        if (!(total > 0)) continue;  // also catches a NaN total; nothing was gathered then

        st.items.resize(n_touched);
        Item* items = st.items.data();
        size_t n_items = 0;
        for (size_t r = 0; r < n_touched; ++r) {
            const i32 tok = touched[r];
            const double key = acc[tok] / cfg.token_median[tok];
            acc[tok] = 0.0;
            items[n_items] = Item{descending_order(key), tok};
            n_items += (key != 0);  // branch-free drop of zero keys
        }
        if (n_items == 0) continue;
        st.items.resize(n_items);
        const i64 keep = std::min(static_cast<i64>(n_items), cfg.budget);
        bucket_rank(st.items, st.spare, st.counts, keep);
        if (cfg.cls_token >= 0) *w++ = cfg.cls_token;
        for (i64 r = 0; r < keep; ++r) *w++ = st.items[static_cast<size_t>(r)].token;
        if (cfg.eos_token >= 0) *w++ = cfg.eos_token;
        lengths[i] = keep + n_special;
    }
    st.n_written = w - out;
}

}  // namespace

i64 find_bad_col_token(const i32* col_token, i64 n_cols, i64 n_tokens) {
    for (i64 c = 0; c < n_cols; ++c) {
        if (col_token[c] >= n_tokens) return c;  // any negative id means "not in the vocabulary"
    }
    return -1;
}

RankResult& RankResult::operator=(RankResult&& o) noexcept {
    if (this != &o) {
        std::free(tokens);
        tokens = o.tokens;
        n_tokens = o.n_tokens;
        error = o.error;
        o.tokens = nullptr;
    }
    return *this;
}

RankResult::~RankResult() { std::free(tokens); }

template <class IP, class IX, class DT>
RankResult rank_tokenize(const CsrChunk<IP, IX, DT>& chunk, const RankConfig& cfg, int n_threads,
                         i64* offsets, double* cell_totals) {
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
    if (slot[n_parts] > 0) {
        buffer = static_cast<i32*>(std::malloc(static_cast<size_t>(slot[n_parts]) * sizeof(i32)));
        if (buffer == nullptr) throw std::bad_alloc();
    }
    result.tokens = buffer;  // owned (freed) by result from here on

    std::vector<ThreadState> states(static_cast<size_t>(n_parts));
    i64* lengths = offsets + 1;  // lengths first, prefix-summed in place below
    run_parts(n_parts, [&](int p) {
        ThreadState& st = states[static_cast<size_t>(p)];
        tokenize_range(chunk, cfg, bounds[p], bounds[p + 1], st, buffer + slot[p], lengths, cell_totals);
        st.acc = std::vector<double>();  // free the scratch early
        st.items = std::vector<Item>();
        st.spare = std::vector<Item>();
    });
    for (auto& st : states) result.error.merge(st.error);
    if (!result.error.ok()) {
        std::free(result.release());
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
        std::free(result.release());
    } else if (result.n_tokens < slot[n_parts]) {
        // give the unused tail back (glibc shrinks large mmap-ed blocks in place)
        void* shrunk = std::realloc(buffer, static_cast<size_t>(result.n_tokens) * sizeof(i32));
        if (shrunk != nullptr) result.tokens = static_cast<i32*>(shrunk);
    }
    return result;
}

// The 8 supported layouts: indptr, indices in {int32, int64}; data in {float32, float64}.
#define SCFM_INSTANTIATE(IP, IX, DT)                                                              \
    template RankResult rank_tokenize<IP, IX, DT>(const CsrChunk<IP, IX, DT>&, const RankConfig&, \
                                                  int, i64*, double*);
SCFM_INSTANTIATE(i32, i32, float)
SCFM_INSTANTIATE(i32, i32, double)
SCFM_INSTANTIATE(i32, i64, float)
SCFM_INSTANTIATE(i32, i64, double)
SCFM_INSTANTIATE(i64, i32, float)
SCFM_INSTANTIATE(i64, i32, double)
SCFM_INSTANTIATE(i64, i64, float)
SCFM_INSTANTIATE(i64, i64, double)
#undef SCFM_INSTANTIATE

}  // namespace scfm
