// Shared plumbing of the scfm_fast C++ core: integer typedefs, CSR chunk views, the structured
// per-cell error, and a tiny fork-safe thread launcher.  No Python headers here (see bindings.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace scfm {

using i32 = std::int32_t;
using i64 = std::int64_t;
using u32 = std::uint32_t;
using u64 = std::uint64_t;

// A chunk of cells in CSR layout over the *source* gene columns.  Entry indices reported in errors
// are absolute positions in `data` (the same numbering NumPy uses), not offsets from indptr[0].
// The 8 supported CSR layouts (indptr, indices in {int32, int64}; data in {float32, float64}), as an
// X-macro: each .cpp instantiates its templates with SCFM_CSR_LAYOUTS(ITS_MACRO), so the list lives
// in one place.
#define SCFM_CSR_LAYOUTS(X) \
    X(::scfm::i32, ::scfm::i32, float)  \
    X(::scfm::i32, ::scfm::i32, double) \
    X(::scfm::i32, ::scfm::i64, float)  \
    X(::scfm::i32, ::scfm::i64, double) \
    X(::scfm::i64, ::scfm::i32, float)  \
    X(::scfm::i64, ::scfm::i32, double) \
    X(::scfm::i64, ::scfm::i64, float)  \
    X(::scfm::i64, ::scfm::i64, double)

template <class IP, class IX, class DT>
struct CsrChunk {
    const IP* indptr = nullptr;  // n_cells + 1 entries, non-decreasing
    i64 n_cells = 0;
    const IX* indices = nullptr;  // source gene column of each stored entry
    const DT* data = nullptr;     // counts
};

// What went wrong with the input, reported back instead of thrown from worker threads so that the
// binding layer can build the Python exception (the message text lives on the Python side, shared
// with the NumPy oracle).
enum class ErrorKind : int { none = 0, bad_count = 1, bad_index = 2 };

struct CellError {
    ErrorKind kind = ErrorKind::none;
    i64 row = -1;    // cell row within the chunk
    i64 entry = -1;  // absolute stored-entry index into data / indices
    i64 col = -1;    // the offending column (bad_index only)

    bool ok() const { return kind == ErrorKind::none; }

    // Keep the error the oracle would raise: any bad count beats any bad index (counts are checked
    // over the whole chunk first), and within a kind the lowest entry wins.  This makes the
    // reported error independent of how cells were split over threads.
    void merge(const CellError& other) {
        if (other.ok()) return;
        if (ok() || static_cast<int>(other.kind) < static_cast<int>(kind) ||
            (other.kind == kind && other.entry < entry)) {
            *this = other;
        }
    }
};

// Split cells [0, n_cells) into `n_parts` contiguous ranges of about equal work.  Work of a cell is
// its number of stored entries plus a constant (so runs of empty cells still spread out).
template <class IP>
std::vector<i64> split_cells(const IP* indptr, i64 n_cells, int n_parts) {
    constexpr i64 kCellCost = 16;
    std::vector<i64> bounds(static_cast<size_t>(n_parts) + 1, n_cells);
    bounds[0] = 0;
    const i64 base = static_cast<i64>(indptr[0]);
    auto work_before = [&](i64 i) { return (static_cast<i64>(indptr[i]) - base) + kCellCost * i; };
    const i64 total = work_before(n_cells);
    for (int p = 1; p < n_parts; ++p) {
        const i64 target = total / n_parts * p + (total % n_parts) * p / n_parts;
        // first cell whose preceding work reaches the target (work_before is non-decreasing)
        i64 lo = bounds[p - 1], hi = n_cells;
        while (lo < hi) {
            const i64 mid = lo + (hi - lo) / 2;
            if (work_before(mid) < target) lo = mid + 1; else hi = mid;
        }
        bounds[p] = lo;
    }
    return bounds;
}

// Run fn(part) for part in [0, n_parts): part 0 on the calling thread, the others on fresh
// std::threads joined before returning.  No persistent pool, so nothing survives into a fork()ed
// child.  The first exception (e.g. std::bad_alloc) is rethrown after every thread has joined.
template <class F>
void run_parts(int n_parts, F&& fn) {
    if (n_parts <= 1) {
        fn(0);
        return;
    }
    std::vector<std::exception_ptr> errors(static_cast<size_t>(n_parts));
    std::vector<std::thread> threads;
    threads.reserve(static_cast<size_t>(n_parts) - 1);
    auto guarded = [&](int p) {
        try {
            fn(p);
        } catch (...) {
            errors[static_cast<size_t>(p)] = std::current_exception();
        }
    };
    for (int p = 1; p < n_parts; ++p) threads.emplace_back(guarded, p);
    guarded(0);
    for (auto& t : threads) t.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

}  // namespace scfm
