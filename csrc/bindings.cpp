// The only Python-facing file of the compiled core: argument checks that name the argument, dtype
// dispatch, GIL release around whole chunks, one m.def per entry point.  Semantics live in the
// pure C++ files; error *messages* about bad counts live in Python (shared with the NumPy oracle).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdlib>
#include <string>

#include "count_sums.hpp"
#include "rank_tokenize.hpp"
#include "value_tokenize.hpp"

namespace py = pybind11;
using scfm::i32;
using scfm::i64;

namespace {

PyObject* g_cell_data_error = nullptr;  // scfm_fast._core.CellDataError

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

void require_vector(const py::array& a, const char* name) {
    if (a.ndim() != 1) {
        throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(a.ndim()) + " dimensions");
    }
    if (!(a.flags() & py::array::c_style)) {
        throw py::value_error(std::string(name) + " must be C-contiguous (use numpy.ascontiguousarray)");
    }
}

template <class T>
bool has_dtype(const py::array& a) {
    return a.dtype().equal(py::dtype::of<T>());
}

template <class T>
const T* checked_ptr(const py::array& a, const char* name, const char* want) {
    require_vector(a, name);
    if (!has_dtype<T>(a)) {
        throw py::type_error(std::string(name) + " must have dtype " + want + ", got " + dtype_name(a));
    }
    return static_cast<const T*>(a.data());
}

// An optional output argument (the caller's argument keeps it alive): nullptr for None, else the data
// of a 1-D C-contiguous writeable array of dtype T, its length in `size` (errors name the argument).
template <class T>
T* optional_output(const py::object& obj, const char* name, const char* want, i64& size) {
    size = 0;
    if (obj.is_none()) return nullptr;
    if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + " must be a numpy array or None");
    auto arr = py::reinterpret_borrow<py::array>(obj);
    checked_ptr<T>(arr, name, want);
    if (!arr.writeable()) throw py::value_error(std::string(name) + " must be writeable");
    size = static_cast<i64>(arr.shape(0));
    return static_cast<T*>(arr.mutable_data());
}

// Calls f(IX{}, DT{}) with the C++ types of the indices' and data's dtypes (int32/int64 x
// float32/float64), or raises a TypeError naming the argument.
template <class F>
void with_indices_data(const py::array& indices, const py::array& data, F&& f) {
    auto with_data = [&](auto ix) {
        if (has_dtype<float>(data)) return f(ix, float{});
        if (has_dtype<double>(data)) return f(ix, double{});
        throw py::type_error("data must have dtype float32 or float64, got " + dtype_name(data));
    };
    if (has_dtype<i32>(indices)) return with_data(i32{});
    if (has_dtype<i64>(indices)) return with_data(i64{});
    throw py::type_error("indices must have dtype int32 or int64, got " + dtype_name(indices));
}

[[noreturn]] void raise_cell_error(const scfm::CellError& e) {
    const char* kind = e.kind == scfm::ErrorKind::bad_count ? "count" : "index";
    py::tuple args = py::make_tuple(kind, e.row, e.entry, e.col);
    PyErr_SetObject(g_cell_data_error, args.ptr());
    throw py::error_already_set();
}

template <class IP, class IX, class DT>
py::tuple run_typed(const py::array& indptr, const py::array& indices, const py::array& data,
                    const scfm::RankConfig& cfg, int n_threads, const py::object& out,
                    const py::object& sums) {
    scfm::CsrChunk<IP, IX, DT> chunk;
    chunk.indptr = static_cast<const IP*>(indptr.data());
    chunk.n_cells = static_cast<i64>(indptr.shape(0)) - 1;
    chunk.indices = static_cast<const IX*>(indices.data());
    chunk.data = static_cast<const DT*>(data.data());
    const i64 n_data = static_cast<i64>(data.shape(0));
    // Bounds of the rows must lie inside data/indices: the core trusts them.
    i64 prev = 0;
    for (i64 i = 0; i <= chunk.n_cells; ++i) {
        const i64 v = static_cast<i64>(chunk.indptr[i]);
        if (v < prev || v > n_data) {
            throw py::value_error("indptr must be non-decreasing, start >= 0 and end <= len(data)=" +
                                  std::to_string(n_data) + "; indptr[" + std::to_string(i) + "]=" +
                                  std::to_string(v));
        }
        prev = v;
    }
    py::array_t<i64> offsets(chunk.n_cells + 1);
    py::array_t<double> cell_totals(std::max<i64>(chunk.n_cells, 0));
    i64* off_ptr = offsets.mutable_data();
    double* tot_ptr = cell_totals.mutable_data();
    i64 out_capacity = 0, n_sums = 0;
    i32* const out_ptr = optional_output<i32>(out, "out", "int32", out_capacity);
    double* const sums_ptr = optional_output<double>(sums, "sums", "float64", n_sums);
    if (sums_ptr != nullptr && n_sums != 3) throw py::value_error("sums must have 3 elements (total, matched, exact)");
    scfm::RankResult result;
    {
        py::gil_scoped_release release;
        result = scfm::rank_tokenize(chunk, cfg, n_threads, off_ptr, tot_ptr, out_ptr, out_capacity);
    }
    if (!result.error.ok()) raise_cell_error(result.error);
    if (sums_ptr != nullptr) {
        // the rows must span the arrays for these to be the sums of every stored count
        const bool spans = static_cast<i64>(chunk.indptr[0]) == 0 && static_cast<i64>(chunk.indptr[chunk.n_cells]) == n_data;
        const bool exact = result.sums.exact && spans;
        sums_ptr[0] = exact ? result.sums.total : 0.0;
        sums_ptr[1] = exact ? result.sums.matched : 0.0;
        sums_ptr[2] = exact ? 1.0 : 0.0;
    }
    // Hand the core's buffer to NumPy without copying; the capsule frees it with the array.
    const i64 n_tokens = result.n_tokens;
    py::array_t<i32> tokens;
    if (n_tokens == 0) {
        tokens = py::array_t<i32>(0);
    } else if (result.external) {
        py::object view = out[py::slice(0, static_cast<py::ssize_t>(n_tokens), 1)];  // a view of out
        tokens = py::reinterpret_borrow<py::array_t<i32>>(view);
    } else {
        i32* buf = result.release();
        py::capsule owner(buf, [](void* p) { scfm::release_token_buffer(static_cast<i32*>(p)); });
        tokens = py::array_t<i32>({n_tokens}, {static_cast<i64>(sizeof(i32))}, buf, owner);
    }
    return py::make_tuple(tokens, offsets, cell_totals);
}

template <class IP, class IX>
py::tuple dispatch_data(const py::array& indptr, const py::array& indices, const py::array& data,
                        const scfm::RankConfig& cfg, int n_threads, const py::object& out,
                        const py::object& sums) {
    if (has_dtype<float>(data)) return run_typed<IP, IX, float>(indptr, indices, data, cfg, n_threads, out, sums);
    if (has_dtype<double>(data)) return run_typed<IP, IX, double>(indptr, indices, data, cfg, n_threads, out, sums);
    throw py::type_error("data must have dtype float32 or float64, got " + dtype_name(data));
}

template <class IP>
py::tuple dispatch_indices(const py::array& indptr, const py::array& indices, const py::array& data,
                           const scfm::RankConfig& cfg, int n_threads, const py::object& out,
                           const py::object& sums) {
    if (has_dtype<i32>(indices)) return dispatch_data<IP, i32>(indptr, indices, data, cfg, n_threads, out, sums);
    if (has_dtype<i64>(indices)) return dispatch_data<IP, i64>(indptr, indices, data, cfg, n_threads, out, sums);
    throw py::type_error("indices must have dtype int32 or int64, got " + dtype_name(indices));
}

py::tuple rank_tokenize(const py::array& indptr, const py::array& indices, const py::array& data,
                        const py::array& col_token, const py::array& token_median,
                        const py::object& totals, i64 budget, i32 cls_token, i32 eos_token,
                        bool allow_non_integer, int n_threads, const py::object& out,
                        const py::object& sums) {
    require_vector(indptr, "indptr");
    require_vector(indices, "indices");
    require_vector(data, "data");
    if (indptr.shape(0) < 1) throw py::value_error("indptr must have at least one element (n_cells + 1)");
    if (indices.shape(0) != data.shape(0)) {
        throw py::value_error("indices and data must have the same length, got " +
                              std::to_string(indices.shape(0)) + " and " + std::to_string(data.shape(0)));
    }
    if (budget < 1) throw py::value_error("max_len leaves no room for genes (budget " + std::to_string(budget) + ")");
    if (n_threads < 1) throw py::value_error("n_threads must be >= 1, got " + std::to_string(n_threads));
    scfm::RankConfig cfg;
    cfg.col_token = checked_ptr<i32>(col_token, "col_token", "int32");
    cfg.n_cols = static_cast<i64>(col_token.shape(0));
    cfg.token_median = checked_ptr<double>(token_median, "token_median", "float64");
    cfg.n_tokens = static_cast<i64>(token_median.shape(0));
    const i64 bad_col = scfm::find_bad_col_token(cfg.col_token, cfg.n_cols, cfg.n_tokens);
    if (bad_col >= 0) {
        throw py::value_error("col_token[" + std::to_string(bad_col) + "]=" +
                              std::to_string(cfg.col_token[bad_col]) + " is not negative (unmapped) or a valid index into token_median (length " +
                              std::to_string(cfg.n_tokens) + ")");
    }
    const i64 n_cells = static_cast<i64>(indptr.shape(0)) - 1;
    py::array totals_arr;  // keeps the array alive while the core reads it
    if (!totals.is_none()) {
        if (!py::isinstance<py::array>(totals)) throw py::type_error("totals must be a numpy array or None");
        totals_arr = py::reinterpret_borrow<py::array>(totals);
        cfg.totals = checked_ptr<double>(totals_arr, "totals", "float64");
        if (static_cast<i64>(totals_arr.shape(0)) != n_cells) {
            throw py::value_error("totals must have one value per cell (" + std::to_string(n_cells) + "), got " +
                                  std::to_string(totals_arr.shape(0)));
        }
    }
    cfg.budget = budget;
    cfg.cls_token = cls_token;
    cfg.eos_token = eos_token;
    cfg.allow_non_integer = allow_non_integer;
    if (has_dtype<i32>(indptr)) return dispatch_indices<i32>(indptr, indices, data, cfg, n_threads, out, sums);
    if (has_dtype<i64>(indptr)) return dispatch_indices<i64>(indptr, indices, data, cfg, n_threads, out, sums);
    throw py::type_error("indptr must have dtype int32 or int64, got " + dtype_name(indptr));
}

// GeneCompass values of tokens ranked by rank_tokenize on the same chunk (see value_tokenize.hpp).
py::array_t<float> token_values(const py::array& indptr, const py::array& indices, const py::array& data,
                                const py::array& col_token, const py::array& token_median,
                                const py::array& tokens, const py::array& offsets, const py::object& cell_factor,
                                int n_threads) {
    require_vector(indices, "indices");
    require_vector(data, "data");
    if (indices.shape(0) != data.shape(0)) throw py::value_error("indices and data must have the same length");
    if (n_threads < 1) throw py::value_error("n_threads must be >= 1, got " + std::to_string(n_threads));
    scfm::ValueConfig cfg;
    cfg.col_token = checked_ptr<i32>(col_token, "col_token", "int32");
    cfg.n_cols = static_cast<i64>(col_token.shape(0));
    cfg.token_median = checked_ptr<double>(token_median, "token_median", "float64");
    cfg.n_tokens = static_cast<i64>(token_median.shape(0));
    if (scfm::find_bad_col_token(cfg.col_token, cfg.n_cols, cfg.n_tokens) >= 0) {
        throw py::value_error("col_token has ids outside token_median");
    }
    const i32* tok = checked_ptr<i32>(tokens, "tokens", "int32");
    const i64* off = checked_ptr<i64>(offsets, "offsets", "int64");
    const i64 n_cells = static_cast<i64>(offsets.shape(0)) - 1;
    if (n_cells < 0 || static_cast<i64>(indptr.shape(0)) != n_cells + 1) {
        throw py::value_error("offsets and indptr must both have n_cells + 1 elements");
    }
    for (i64 i = 0; i <= n_cells; ++i) {
        if ((i == 0 && off[0] != 0) || (i > 0 && off[i] < off[i - 1])) throw py::value_error("offsets must start at 0 and be non-decreasing");
    }
    if (off[n_cells] != static_cast<i64>(tokens.shape(0))) throw py::value_error("offsets[-1] must equal len(tokens)");
    py::array factor_arr;
    if (!cell_factor.is_none()) {
        factor_arr = py::reinterpret_borrow<py::array>(cell_factor);
        cfg.cell_factor = checked_ptr<double>(factor_arr, "cell_factor", "float64");
        if (static_cast<i64>(factor_arr.shape(0)) != n_cells) throw py::value_error("cell_factor must have one value per cell");
    }
    py::array_t<float> values(static_cast<i64>(tokens.shape(0)));
    float* out = values.mutable_data();
    i64 bad = -1;
    auto run = [&](auto ip, auto ix, auto dt) {
        using IP = decltype(ip);
        using IX = decltype(ix);
        using DT = decltype(dt);
        scfm::CsrChunk<IP, IX, DT> chunk;
        chunk.indptr = checked_ptr<IP>(indptr, "indptr", "int32/int64");
        chunk.n_cells = n_cells;
        chunk.indices = static_cast<const IX*>(indices.data());
        chunk.data = static_cast<const DT*>(data.data());
        for (i64 i = 0; i <= n_cells; ++i) {
            const i64 v = static_cast<i64>(chunk.indptr[i]);
            if (v < 0 || v > static_cast<i64>(data.shape(0)) || (i > 0 && v < static_cast<i64>(chunk.indptr[i - 1]))) {
                throw py::value_error("indptr must be non-decreasing within [0, len(data)]");
            }
        }
        py::gil_scoped_release release;
        bad = scfm::token_values(chunk, cfg, tok, off, out, n_threads);
    };
    auto with_indices = [&](auto ip) { with_indices_data(indices, data, [&](auto ix, auto dt) { run(ip, ix, dt); }); };
    if (has_dtype<i32>(indptr)) with_indices(i32{});
    else if (has_dtype<i64>(indptr)) with_indices(i64{});
    else throw py::type_error("indptr must have dtype int32 or int64, got " + dtype_name(indptr));
    if (bad >= 0) {
        throw py::value_error("cell row " + std::to_string(bad) +
                              ": tokens are not the row's vocabulary genes or a column index is out of range "
                              "(tokens/offsets must come from rank_tokenize on the same chunk)");
    }
    return values;
}

// Match-report sums of a chunk (see count_sums.hpp); GIL released.
py::tuple count_sums(const py::array& indices, const py::array& data, const py::array& col_token) {
    require_vector(indices, "indices");
    require_vector(data, "data");
    if (indices.shape(0) != data.shape(0)) throw py::value_error("indices and data must have the same length");
    const i32* ct = checked_ptr<i32>(col_token, "col_token", "int32");
    const i64 n = static_cast<i64>(data.shape(0));
    const i64 n_cols = static_cast<i64>(col_token.shape(0));
    scfm::CountSums s;
    auto run = [&](auto ix, auto dt) {
        using IX = decltype(ix);
        using DT = decltype(dt);
        const auto* ip = static_cast<const IX*>(indices.data());
        const auto* dp = static_cast<const DT*>(data.data());
        py::gil_scoped_release release;
        s = scfm::count_sums(ip, dp, n, ct, n_cols);
    };
    with_indices_data(indices, data, run);
    if (s.bad_entry >= 0) {
        throw py::value_error("stored entry " + std::to_string(s.bad_entry) + " has a gene column index outside col_token (length " +
                              std::to_string(n_cols) + ")");
    }
    return py::make_tuple(s.total, s.matched);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "scfm_fast compiled core (pure C++ in csrc/, bound here). Use scfm_fast.tokenizer.rank instead.";

    g_cell_data_error = PyErr_NewExceptionWithDoc(
        "scfm_fast._core.CellDataError",
        "Bad input found by the core; args = (kind, row, entry, col) with kind 'count' or 'index'.",
        PyExc_ValueError, nullptr);
    if (g_cell_data_error == nullptr) throw py::error_already_set();
    m.attr("CellDataError") = py::handle(g_cell_data_error);

    m.def("rank_tokenize", &rank_tokenize, py::arg("indptr"), py::arg("indices"), py::arg("data"),
          py::arg("col_token"), py::arg("token_median"), py::arg("totals").none(true), py::arg("budget"),
          py::arg("cls_token"), py::arg("eos_token"), py::arg("allow_non_integer"), py::arg("n_threads"),
          py::arg("out") = py::none(), py::arg("sums") = py::none(),
          R"doc(Rank-value tokenize a CSR chunk (see scfm_fast.tokenizer.reference.rank_tokenize_ref).

Arrays must be 1-D and C-contiguous: indptr int32/int64, indices int32/int64, data float32/float64,
col_token int32, token_median float64, totals float64 or None.  budget = max_len minus special tokens.
Runs with the GIL released on up to n_threads threads.  Returns (tokens int32, offsets int64,
totals float64); with out (1-D C-contiguous writeable int32) at least rank_output_bound() long,
tokens are a view of out (overwritten by the next call that reuses it).  With sums (float64, 3
elements, writeable) it is set to (total, matched, 1.0) when the chunk's count sums (see count_sums)
were taken exactly in the same pass, else to (0, 0, 0.0): then call count_sums.  Raises CellDataError(kind, row, entry, col) on the first bad count (or, when there
is none, the first out-of-range column index) in stored order.)doc");

    m.def("token_values", &token_values, py::arg("indptr"), py::arg("indices"), py::arg("data"),
          py::arg("col_token"), py::arg("token_median"), py::arg("tokens"), py::arg("offsets"),
          py::arg("cell_factor").none(true), py::arg("n_threads"),
          R"doc(GeneCompass values of the tokens rank_tokenize returned for the same chunk (budget = max_len,
no special tokens): float32 log2(1 + sum / median * cell_factor[i]) per token, cell_factor None = 1
(see scfm_fast.tokenizer.reference.value_tokenize_ref).  GIL released; tokens int32, offsets int64,
cell_factor float64 or None.)doc");

    m.def("count_sums", &count_sums, py::arg("indices"), py::arg("data"), py::arg("col_token"),
          R"doc(Match-report sums of a chunk: (total of all stored counts, total of those whose column has a
token, col_token >= 0), each a sequential float64 sum in stored order.  indices int32/int64, data
float32/float64, col_token int32.  Raises ValueError on a column index outside col_token.)doc");

    m.def("set_gather_simd", &scfm::set_gather_simd, py::arg("enabled"),
          R"doc(Turn the AVX-512 direct gather of rank_tokenize on (where the CPU has it) or off; returns
whether it is on.  Tokens and sums are the same either way (tests and A/B runs use this).)doc");

    m.def("build_info", []() {
        py::dict info;
#if defined(__clang__)
        info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
        info["compiler"] = std::string("gcc ") + __VERSION__;
#else
        info["compiler"] = std::string("unknown");
#endif
        info["hardware_threads"] = static_cast<int>(std::thread::hardware_concurrency());
        info["avx512_gather"] = scfm::gather_simd_active() ? "on" : "off";
        return info;
    }, "Compiler and hardware facts of this build (for `python -m scfm_fast.info`).");
}
