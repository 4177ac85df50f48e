"""Arrow arrays built from numpy buffers, without pyarrow's pandas probe.

``pyarrow.array(x)`` asks, for every input that is not already Arrow, whether it is a pandas object, and
to answer it imports pandas (~0.4 s of CPU, once per process: in every tokenize worker). The tokenize
path builds its arrays from buffers instead; the results equal ``pyarrow.array``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from numpy.typing import DTypeLike


def _bits(flags: np.ndarray) -> pa.Buffer:
    return pa.py_buffer(np.packbits(np.asarray(flags, dtype=bool), bitorder="little"))


def array(values: np.ndarray, *, mask: np.ndarray | None = None, dtype: DTypeLike = None) -> pa.Array:
    """A 1-D numeric or boolean numpy array as Arrow (``mask``: True = null), like ``pa.array(values, mask=)``.

    ``dtype`` converts ``values`` first (``np.int32`` for int64 offsets).
    """
    values = np.asarray(values, dtype=dtype)
    if values.ndim != 1 or values.dtype.kind not in "biuf":
        msg = f"expected a 1-D numeric or boolean array, got {values.dtype} with shape {values.shape}"
        raise TypeError(msg)
    n = int(values.shape[0])
    validity, null_count = None, 0
    if mask is not None and np.any(mask):
        validity, null_count = _bits(~np.asarray(mask, dtype=bool)), int(np.count_nonzero(mask))
    if values.dtype.kind == "b":
        data = _bits(values)
    else:
        data = pa.py_buffer(np.ascontiguousarray(values))
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), n, [validity, data], null_count=null_count)


def list_array(offsets: np.ndarray, values: pa.Array) -> pa.ListArray:
    """A list column: row ``i`` is ``values[offsets[i]:offsets[i + 1]]`` (``offsets`` must fit int32)."""
    return pa.ListArray.from_arrays(array(offsets, dtype=np.int32), values)


def strings(values: Sequence[str | None]) -> pa.StringArray:
    """Python strings (``None`` = null) as an Arrow ``string`` array."""
    encoded = [b"" if v is None else v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    if offsets[-1] >= 2**31:
        msg = f"{offsets[-1]} bytes of text do not fit one Arrow string array"
        raise ValueError(msg)
    nulls = np.fromiter((v is None for v in values), dtype=bool, count=len(encoded))
    validity = _bits(~nulls) if nulls.any() else None
    return pa.Array.from_buffers(pa.string(), len(encoded),
                                 [validity, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))],
                                 null_count=int(nulls.sum()))


def numpy_dtype(t: pa.DataType) -> np.dtype | None:
    """The numpy dtype of an Arrow integer or float32/64 type (None for any other type)."""
    if pa.types.is_integer(t):
        return np.dtype(f"{'u' if pa.types.is_unsigned_integer(t) else 'i'}{t.bit_width // 8}")
    if pa.types.is_floating(t) and t.bit_width in (32, 64):
        return np.dtype(f"f{t.bit_width // 8}")
    return None


def to_numpy(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric Arrow array (or chunked array) as numpy, a view of its buffer where it is one chunk.

    Arrays with nulls and other types go through ``to_numpy(zero_copy_only=False)`` (which imports pandas).
    """
    if isinstance(arr, pa.ChunkedArray):
        parts = [to_numpy(c) for c in arr.chunks]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            dtype = numpy_dtype(arr.type)
            return np.empty(0, dtype=dtype) if dtype is not None else arr.to_numpy()
        return np.concatenate(parts)
    dtype = numpy_dtype(arr.type)
    if dtype is None or arr.null_count:
        return arr.to_numpy(zero_copy_only=False)
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)
