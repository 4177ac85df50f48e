"""Type stub for the compiled core ``scfm_fast._core`` (csrc/bindings.cpp); checked by
tests/tokenizer/test_core_stub.py against the built module."""

import numpy as np
import numpy.typing as npt

class CellDataError(ValueError):
    """Bad input found by the core; ``args == (kind, row, entry, col)``, kind ``"count"`` or ``"index"``."""

def rank_tokenize(
    indptr: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    indices: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    data: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    col_token: npt.NDArray[np.int32],
    token_median: npt.NDArray[np.float64],
    totals: npt.NDArray[np.float64] | None,
    budget: int,
    cls_token: int,
    eos_token: int,
    allow_non_integer: bool,
    n_threads: int,
    out: npt.NDArray[np.int32] | None = None,
    sums: npt.NDArray[np.float64] | None = None,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64], npt.NDArray[np.float64]]: ...
def count_sums(
    indices: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    data: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    col_token: npt.NDArray[np.int32],
) -> tuple[float, float]: ...
def set_gather_simd(enabled: bool) -> bool: ...
def build_info() -> dict[str, str | int]: ...
def token_values(
    indptr: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    indices: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    data: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    col_token: npt.NDArray[np.int32],
    token_median: npt.NDArray[np.float64],
    tokens: npt.NDArray[np.int32],
    offsets: npt.NDArray[np.int64],
    cell_factor: npt.NDArray[np.float64] | None,
    n_threads: int,
) -> npt.NDArray[np.float32]: ...
