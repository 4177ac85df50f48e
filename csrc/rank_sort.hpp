// Ranking of one cell's candidates for rank_tokenize.cpp: the (order, token) arrays a gather fills,
// and the radix sort that writes their tokens in rank order.
#pragma once

#include <algorithm>
#include <cstring>
#include <vector>

#include "common.hpp"

namespace scfm {

// The key mapped to an unsigned integer whose *ascending* order is the key's *descending* order
// (standard monotone map of IEEE doubles onto unsigned integers: negative: flip all bits, else set
// the sign bit; inverted for descending: negative -> bits, else bits ^ 0x7fff...).  Equal keys map
// to equal integers, but NaN keys are not yet placed: see nan_last.
inline u64 raw_order(double key) {
    u64 bits;
    std::memcpy(&bits, &key, sizeof bits);
    const u64 negative = static_cast<u64>(static_cast<std::int64_t>(bits) >> 63);
    return bits ^ (~negative >> 1);
}

// raw_order's image of the keys the gathers must treat apart: orders below kRawPosInf are positive
// NaNs, above kRawNegInf negative NaNs, and kRawPosZero / kRawNegZero are +0.0 / -0.0.  Positive
// nonzero non-NaN keys (the common case) lie in [kRawPosInf, kRawPosZero).
constexpr u64 kRawPosInf = 0x000fffffffffffffULL, kRawPosZero = 0x7fffffffffffffffULL;
constexpr u64 kRawNegZero = 0x8000000000000000ULL, kRawNegInf = 0xfff0000000000000ULL;

// A raw order with NaN last (as NumPy's lexsort on -key puts NaN last): every NaN maps to
// all-ones.  (order, token) is then a strict total order, so sort, nth_element and any thread split
// all give the same tokens.  Zero keys are dropped (fix_odd_keys) before any sort, so -0.0 / +0.0
// need no care.
inline u64 nan_last(u64 raw) { return (raw < kRawPosInf || raw > kRawNegInf) ? ~u64{0} : raw; }

// One cell's candidates as parallel arrays (8-byte orders and 4-byte tokens: the sort moves only
// 8-byte words of digest and index, and reads these by index).
struct Candidates {
    std::vector<u64> orders;
    std::vector<i32> tokens;
    size_t n = 0;            // candidates in use
    u64 lo = 0, hi = 0;      // smallest / largest order among them
    bool odd_keys = false;   // some key may be NaN or +-0.0: fix_odd_keys before sorting

    // Room for n_max candidates, plus kSpare slots past them: the AVX-512 gather stores whole
    // vectors of eight, whose lanes past the kept candidates land there.
    static constexpr size_t kSpare = 8;
    void reserve(size_t n_max) {
        if (orders.size() < n_max + kSpare) {
            orders.resize(n_max + kSpare);
            tokens.resize(n_max + kSpare);
        }
    }

    // Records what a gather found: n candidates whose raw orders lie in [lo, hi] (lo = ~0, hi = 0
    // when none).  Only positive nonzero non-NaN keys lie in [kRawPosInf, kRawPosZero), so bounds
    // outside that range flag keys that fix_odd_keys must handle (never set when n == 0).
    void found(size_t n_found, u64 lo_found, u64 hi_found) {
        n = n_found;
        lo = lo_found;
        hi = hi_found;
        odd_keys = lo < kRawPosInf || hi >= kRawPosZero;
    }

    // Places NaN keys last (nan_last), removes the candidates whose key was +-0.0 and recomputes
    // lo / hi.
    void fix_odd_keys() {
        size_t m = 0;
        lo = ~u64{0};
        hi = 0;
        for (size_t r = 0; r < n; ++r) {
            if (orders[r] == kRawPosZero || orders[r] == kRawNegZero) continue;
            const u64 order = nan_last(orders[r]);
            lo = std::min(lo, order);
            hi = std::max(hi, order);
            orders[m] = order;
            tokens[m++] = tokens[r];
        }
        n = m;
        odd_keys = false;
    }
};

// Appends one gather's candidates without branching on them: every entry is written and `kept`
// only advances the count (the next store address depends on the loads, never on the division).
// Writes raw orders and tracks their bounds; NaN and zero keys (from a NaN median, a sum that
// underflows, an infinite median) are rare, and as the bounds show whether any can be present
// (only positive nonzero non-NaN keys lie in [kRawPosInf, kRawPosZero)), fix_odd_keys handles them
// afterwards instead of every entry paying for their tests.
struct CandidateWriter {
    u64* orders;
    i32* tokens;
    size_t n = 0;
    u64 lo = ~u64{0}, hi = 0;

    explicit CandidateWriter(Candidates& c) : orders(c.orders.data()), tokens(c.tokens.data()) {}

    void add(i32 token, double key, bool kept) {
        const u64 order = raw_order(key);
        orders[n] = order;
        tokens[n] = token;
        n += kept;
        lo = kept ? std::min(lo, order) : lo;
        hi = kept ? std::max(hi, order) : hi;
    }

    void finish(Candidates& c) const { c.found(n, lo, hi); }
};

struct RankItem {
    u64 order;
    i32 token;
};

struct SortScratch {
    std::vector<u64> words, spare;  // (digest << 32 | candidate index), sorted by digest
    std::vector<i32> counts;        // the two digit histograms
    std::vector<RankItem> items;    // comparison-sort fallback
};

// Writes to out the tokens of the `keep` smallest candidates by (order, token), in that order.
//
// Most cells have hundreds to thousands of genes, and comparison sorts spend their time in
// mispredicted branches, so this is a radix sort on a monotone digest of the order value (its top
// 16 or 22 bits above `lo`): two stable LSD passes of 8 or 11 bits (8 below 2048 candidates, where
// clearing and prefix-summing 2 x 2048 counters per cell cost more than they save), then one
// insertion pass with the full (order, token) comparison, which only has work where digests
// collide (equal or very close keys).  Exactness only needs the digest to be monotone.  The
// passes move 8-byte words (digest, candidate index) over the gathers' parallel arrays (measured
// as fast as moving 16-byte (order, token) items on PBMC cells).  If collisions pile up (e.g. thousands of equal keys from a vocabulary with repeated
// medians) the insertion pass hands over to introsort, so the worst case stays O(n log n).
inline void radix_rank(const Candidates& cand, i64 keep, SortScratch& s, i32* out) {
    const size_t n = cand.n;
    const u64* const orders = cand.orders.data();
    const i32* const tokens = cand.tokens.data();
    auto introsort = [&]() {
        s.items.resize(n);
        RankItem* const it = s.items.data();
        for (size_t r = 0; r < n; ++r) it[r] = RankItem{orders[r], tokens[r]};
        auto less = [](const RankItem& a, const RankItem& b) {
            return a.order < b.order || (a.order == b.order && a.token < b.token);
        };
        if (static_cast<i64>(n) > keep) std::nth_element(it, it + keep, it + n, less);
        std::sort(it, it + keep, less);
        for (i64 r = 0; r < keep; ++r) out[r] = it[r].token;
    };
    if (n < 192) return introsort();  // the 2 x 256-bucket histograms would dominate

    // Digit width follows n: the two histograms (2 x 2^bits counters, cleared and prefix-summed per
    // cell) should cost less than the two scatter passes over n words.
    const int digit_bits = n < 2048 ? 8 : 11;
    const u32 n_buckets = u32{1} << digit_bits;
    const u32 mask = n_buckets - 1;
    const u64 range = cand.hi - cand.lo;
    int range_bits = 0;
    while (range_bits < 64 && (range >> range_bits) != 0) ++range_bits;
    const int shift = std::max(0, range_bits - 2 * digit_bits);
    s.counts.assign(2 * static_cast<size_t>(n_buckets), 0);
    i32* const c0 = s.counts.data();
    i32* const c1 = c0 + n_buckets;
    s.words.resize(n);
    s.spare.resize(n);
    u64* const a = s.words.data();
    u64* const b = s.spare.data();
    for (size_t r = 0; r < n; ++r) {
        const u32 d = static_cast<u32>((orders[r] - cand.lo) >> shift);
        a[r] = (static_cast<u64>(d) << 32) | r;
        ++c0[d & mask];
        ++c1[d >> digit_bits];
    }
    i32 s0 = 0, s1 = 0;
    for (u32 k = 0; k < n_buckets; ++k) {  // exclusive prefix sums: bucket starts
        const i32 t0 = c0[k], t1 = c1[k];
        c0[k] = s0;
        c1[k] = s1;
        s0 += t0;
        s1 += t1;
    }
    for (size_t r = 0; r < n; ++r) b[c0[(a[r] >> 32) & mask]++] = a[r];
    for (size_t r = 0; r < n; ++r) a[c1[b[r] >> (32 + digit_bits)]++] = b[r];

    // Insertion pass: only runs of equal digests can be out of order.  Words compare by digest
    // first (the high half); equal digests compare by the candidates' (order, token).
    auto less = [&](u64 x, u64 y) {
        if ((x ^ y) >> 32) return x < y;
        const u32 i = static_cast<u32>(x), j = static_cast<u32>(y);
        return orders[i] < orders[j] || (orders[i] == orders[j] && tokens[i] < tokens[j]);
    };
    // The scan tests only for an equal digest (a larger one is never out of order: the words are
    // sorted by digest) and keeps the previous word in a register.
    auto same_digest = [](u64 x, u64 y) { return ((x ^ y) >> 32) == 0; };
    size_t moves = 0;
    u64 prev = a[0];
    for (size_t r = 1; r < n; ++r) {
        const u64 x = a[r];
        if (!same_digest(x, prev) || !less(x, prev)) {
            prev = x;
            continue;
        }
        size_t j = r;
        do {
            a[j] = a[j - 1];
            --j;
        } while (j > 0 && less(x, a[j - 1]));
        a[j] = x;  // prev, shifted up by one, is a[r] now
        moves += r - j;
        if (moves > 16 * n) return introsort();  // many ties: stop paying O(run^2)
    }
    for (i64 r = 0; r < keep; ++r) out[r] = tokens[static_cast<u32>(a[r])];
}

}  // namespace scfm
