// Rank-value tokenization core.  Per cell: validate counts, total (sequential float64 sum in stored
// order), sum duplicate tokens (dense per-thread accumulator + touched list: O(nnz), no hashing),
// key = sum / median, order by (key desc, token asc), truncate, add <cls>/<eos>.
#include "rank_tokenize.hpp"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

namespace scfm {
namespace {

// One ranked candidate.  `order` is the key mapped to an unsigned integer whose *ascending* order is
// the key's *descending* order, with NaN last (as NumPy's lexsort on -key puts NaN last); equal keys
// map to equal integers.  (order, token) is then a strict total order, so sort, nth_element and any
// thread split all give the same tokens.
struct Item {
    u64 order;
    i32 token;
    u32 digest;  // radix_rank's scratch (fills what would be padding)
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
    // Zero keys are dropped (drop_zero_keys) before any sort, so -0.0 / +0.0 need no care.
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
// lo / hi: the smallest and largest order value among the items.
//
// Most cells have hundreds to thousands of genes, and comparison sorts spend their time in
// mispredicted branches, so this is a radix sort on a monotone digest of the order value (its top
// 16 or 22 bits above `lo`): two stable LSD passes of 8 or 11 bits (8 below 2048 items, where
// clearing and prefix-summing 2 x 2048 counters per cell cost more than they save: measured ~7% of
// the core on PBMC cells), then one insertion pass with the full (order, token) comparison, which
// only has work where digests collide (equal or very close keys).  Exactness only needs the digest
// to be monotone.  If collisions pile up (e.g. thousands of equal keys from a vocabulary with
// repeated medians) the insertion pass hands over to introsort, so the worst case stays
// O(n log n).  `spare` and `counts` are reusable scratch.
void radix_rank(std::vector<Item>& items, std::vector<Item>& spare, std::vector<i32>& counts, i64 keep,
                u64 lo, u64 hi) {
    const size_t n = items.size();
    auto introsort = [&](Item* first) {
        if (static_cast<i64>(n) > keep) std::nth_element(first, first + keep, first + n, item_less);
        std::sort(first, first + keep, item_less);
    };
    if (n < 192) return introsort(items.data());  // the 2 x 2048-bucket histograms would dominate

    // Digit width follows n: the two histograms (2 x 2^bits counters, cleared and prefix-summed per
    // cell) should cost less than the two scatter passes over n items.
    const int digit_bits = n < 2048 ? 8 : 11;
    const u32 n_buckets = u32{1} << digit_bits;
    const u32 mask = n_buckets - 1;
    const u64 range = hi - lo;
    int range_bits = 0;
    while (range_bits < 64 && (range >> range_bits) != 0) ++range_bits;
    const int shift = std::max(0, range_bits - 2 * digit_bits);
    counts.assign(2 * static_cast<size_t>(n_buckets), 0);
    i32* const c0 = counts.data();
    i32* const c1 = c0 + n_buckets;
    Item* const a = items.data();
    for (size_t i = 0; i < n; ++i) {
        const u32 d = static_cast<u32>((a[i].order - lo) >> shift);
        a[i].digest = d;
        ++c0[d & mask];
        ++c1[d >> digit_bits];
    }
    i32 s0 = 0, s1 = 0;
    for (u32 b = 0; b < n_buckets; ++b) {  // exclusive prefix sums: bucket starts
        const i32 t0 = c0[b], t1 = c1[b];
        c0[b] = s0;
        c1[b] = s1;
        s0 += t0;
        s1 += t1;
    }
    spare.resize(n);
    Item* const b = spare.data();
    for (size_t i = 0; i < n; ++i) b[c0[a[i].digest & mask]++] = a[i];
    for (size_t i = 0; i < n; ++i) a[c1[b[i].digest >> digit_bits]++] = b[i];

    // Insertion pass: only runs of equal digests can be out of order.
    size_t moves = 0;
    for (size_t i = 1; i < n; ++i) {
        if (!item_less(a[i], a[i - 1])) continue;
        const Item x = a[i];
        size_t j = i;
        do {
            a[j] = a[j - 1];
            --j;
        } while (j > 0 && item_less(x, a[j - 1]));
        a[j] = x;
        moves += i - j;
        if (moves > 16 * n) return introsort(a);  // many ties: stop paying O(run^2)
    }
}

// Removes items whose key was +-0.0 (orders of descending_order(+-0.0)) and recomputes the order
// bounds; returns the new count.
size_t drop_zero_keys(Item* items, size_t n, u64& lo, u64& hi) {
    const u64 pos_zero = descending_order(0.0), neg_zero = descending_order(-0.0);
    size_t m = 0;
    lo = ~u64{0};
    hi = 0;
    for (size_t r = 0; r < n; ++r) {
        if (items[r].order == pos_zero || items[r].order == neg_zero) continue;
        lo = std::min(lo, items[r].order);
        hi = std::max(hi, items[r].order);
        items[m++] = items[r];
    }
    return m;
}

// True when every stored entry in [lo, hi) has a valid count (same rule as bad_count) and a column
// index inside [0, n_cols).  Written without branches or early exits so the compiler vectorizes it
// (baseline SSE2): the per-entry tests then leave the gather loop.  Non-integers are found as
// (v + 2^m) - 2^m != v below 2^m (m = mantissa bits: adding 2^m rounds v to an integer).  A false
// "not clean" only costs speed (the checked loop runs), never correctness.
template <class IX, class DT>
bool range_is_clean(const IX* indices, const DT* data, i64 lo, i64 hi, i64 n_cols, bool allow_non_integer) {
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

ZeroedAcc& thread_acc() {
    static thread_local ZeroedAcc acc;
    return acc;
}

struct ThreadState {
    std::vector<i32> touched;    // tokens with acc != 0, in first-seen (column) order
    std::vector<Item> items;     // ranking scratch
    std::vector<Item> spare;     // radix sort buffer
    std::vector<i32> counts;     // radix sort histograms
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
    st.touched.resize(static_cast<size_t>(longest));
    i32* const touched = st.touched.data();
    ZeroedAcc& zeroed = thread_acc();
    const size_t sink = static_cast<size_t>(cfg.n_tokens);
    double* const acc = zeroed.acquire(sink + 1);
    i32* w = out;
    const i64 first = static_cast<i64>(chunk.indptr[c0]), last = static_cast<i64>(chunk.indptr[c1]);
    const bool clean = range_is_clean(chunk.indices, chunk.data, first, last, cfg.n_cols, cfg.allow_non_integer);
    bool producing = true;  // false once a bad index was seen: only count validation continues
    const bool given = cfg.totals != nullptr;

    for (i64 i = c0; i < c1; ++i) {
        const i64 lo = static_cast<i64>(chunk.indptr[i]);
        const i64 hi = static_cast<i64>(chunk.indptr[i + 1]);
        // Row total: the given one, or a sequential sum.  Seeding the sum with -0.0 (the exact
        // additive identity: -0.0 + x == x for every x, +0.0 included) equals seeding it with the
        // first value, which is the oracle's definition; an empty row sums to +0.0.
        double total = given ? cfg.totals[i] : (hi > lo ? -0.0 : 0.0);
        size_t n_touched = 0;
        i64 k = lo;
        if (clean && (!given || total > 0)) {
            // hot loop on a pre-validated range: sum, gather (see the checked loop below)
            for (; k < hi; ++k) {
                const double v = static_cast<double>(chunk.data[k]);
                if (!given) total += v;
                const i32 tok = cfg.col_token[chunk.indices[k]];
                const bool mapped = tok >= 0;
                touched[n_touched] = tok;
                n_touched += static_cast<size_t>(mapped);
                acc[mapped ? static_cast<size_t>(tok) : sink] += v;
            }
        } else if (producing && (!given || total > 0)) {
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
                // pass below drops repeats and zero sums.  0.0 + v == v, so acc holds the
                // sequential sum seeded by the first value, as in the oracle.
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

        st.items.resize(n_touched);
        Item* items = st.items.data();
        size_t n_items = 0;
        u64 order_lo = ~u64{0}, order_hi = 0;
        bool zero_key = false;
        for (size_t r = 0; r < n_touched; ++r) {
            const i32 tok = touched[r];
            const double sum = acc[tok];
            acc[tok] = 0.0;  // a repeat of this token later in the list reads 0 and is dropped
            const double key = sum / cfg.token_median[tok];
            const u64 order = descending_order(key);
            items[n_items] = Item{order, tok, 0};
            // Branch-free drop of repeats and zero counts.  It tests the sum, not the key, so the
            // next store address never waits for the division; zero keys (a sum that underflows
            // or an infinite median: rare) are dropped in a second pass.
            const bool kept = sum != 0;
            n_items += kept;
            zero_key |= kept & (key == 0);
            order_lo = kept ? std::min(order_lo, order) : order_lo;
            order_hi = kept ? std::max(order_hi, order) : order_hi;
        }
        if (zero_key) n_items = drop_zero_keys(items, n_items, order_lo, order_hi);
        if (n_items == 0) continue;
        st.items.resize(n_items);
        const i64 keep = std::min(static_cast<i64>(n_items), cfg.budget);
        radix_rank(st.items, st.spare, st.counts, keep, order_lo, order_hi);
        if (cfg.cls_token >= 0) *w++ = cfg.cls_token;
        for (i64 r = 0; r < keep; ++r) *w++ = st.items[static_cast<size_t>(r)].token;
        if (cfg.eos_token >= 0) *w++ = cfg.eos_token;
        lengths[i] = keep + n_special;
    }
    st.n_written = w - out;
    acc[sink] = 0.0;  // every touched slot was reset per cell; the sink is the only dirty one
    zeroed.clean = true;
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
        if (!external) std::free(tokens);
        tokens = o.tokens;
        n_tokens = o.n_tokens;
        error = o.error;
        external = o.external;
        o.tokens = nullptr;
    }
    return *this;
}

RankResult::~RankResult() {
    if (!external) std::free(tokens);
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
        buffer = static_cast<i32*>(std::malloc(static_cast<size_t>(slot[n_parts]) * sizeof(i32)));
        if (buffer == nullptr) throw std::bad_alloc();
    }
    result.tokens = buffer;  // owned (freed) by result from here on, unless external

    std::vector<ThreadState> states(static_cast<size_t>(n_parts));
    i64* lengths = offsets + 1;  // lengths first, prefix-summed in place below
    run_parts(n_parts, [&](int p) {
        ThreadState& st = states[static_cast<size_t>(p)];
        tokenize_range(chunk, cfg, bounds[p], bounds[p + 1], st, buffer + slot[p], lengths, cell_totals);
        st.items = std::vector<Item>();
        st.spare = std::vector<Item>();
    });
    for (auto& st : states) result.error.merge(st.error);
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
