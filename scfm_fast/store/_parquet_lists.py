"""Parquet shards whose list columns (``input_ids``, GeneCompass ``values``, ``counts``) are written here.

Why: Arrow's Parquet writer spends most of a shard's write on the token lists, level by level: it builds
one repetition and one definition level per token, encodes both, computes level histograms (size
statistics) and copies the values twice. A token list has a known shape (no nulls: per cell one
repetition level 0 then 1s, every definition level "present"), so its levels are a few RLE runs per cell
and its values can be written straight from the Arrow buffer.

How: pyarrow writes the other columns (any type, statistics as asked) to a small in-memory file; its
footer (Thrift compact protocol) is decoded, the list columns' chunks are written after its column data
(plain-encoded version 1 data pages, uncompressed, no statistics), and the footer is re-encoded with
them: schema, key-value metadata (``ARROW:schema``) and column orders are taken from pyarrow's own
footer for the whole table, so readers see exactly the schema pyarrow would write. Tables this writer
does not cover (a list with nulls, nested obs columns, compression) go to :func:`pyarrow.parquet.write_table`.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import _arrow as arrow

# --- Thrift compact protocol: structs decoded generically, so unknown fields survive a round trip -----
_BOOL_TRUE, _BOOL_FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)


class _Decoder:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = out = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def value(self, t: int) -> Any:
        if t in (_BOOL_TRUE, _BOOL_FALSE):  # only inside containers: one byte
            return self.byte() == 1
        if t == _BYTE:
            return self.byte()
        if t in (_I16, _I32, _I64):
            return self.zigzag()
        if t == _DOUBLE:
            self.pos += 8
            return struct.unpack_from("<d", self.data, self.pos - 8)[0]
        if t == _BINARY:
            n = self.varint()
            self.pos += n
            return bytes(self.data[self.pos - n:self.pos])
        if t in (_LIST, _SET):
            h = self.byte()
            n, et = h >> 4, h & 0x0F
            if n == 15:
                n = self.varint()
            return (et, [self.value(et) for _ in range(n)])
        if t == _STRUCT:
            return self.struct()
        msg = f"Thrift type {t} in a Parquet footer"  # maps: none in Parquet's metadata
        raise ValueError(msg)

    def struct(self) -> list[list]:
        fields, last = [], 0
        while True:
            h = self.byte()
            if h == 0:
                return fields
            delta, t = h >> 4, h & 0x0F
            fid = last + delta if delta else self.zigzag()
            value = t == _BOOL_TRUE if t in (_BOOL_TRUE, _BOOL_FALSE) else self.value(t)
            fields.append([fid, t, value])
            last = fid


def _varint(out: bytearray, n: int) -> None:
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _encode_value(out: bytearray, t: int, v: Any) -> None:
    if t in (_BOOL_TRUE, _BOOL_FALSE):
        out.append(1 if v else 2)
    elif t == _BYTE:
        out.append(v & 0xFF)
    elif t in (_I16, _I32, _I64):
        _varint(out, (v << 1) ^ (v >> 63))
    elif t == _DOUBLE:
        out += struct.pack("<d", v)
    elif t == _BINARY:
        _varint(out, len(v))
        out += v
    elif t in (_LIST, _SET):
        et, items = v
        if len(items) < 15:
            out.append((len(items) << 4) | et)
        else:
            out.append(0xF0 | et)
            _varint(out, len(items))
        for item in items:
            _encode_value(out, et, item)
    elif t == _STRUCT:
        _encode_struct(out, v)
    else:
        msg = f"Thrift type {t}"
        raise ValueError(msg)


def _encode_struct(out: bytearray, fields: list[list]) -> None:
    last = 0
    for fid, t, v in fields:
        if t in (_BOOL_TRUE, _BOOL_FALSE):
            t = _BOOL_TRUE if v else _BOOL_FALSE
        if 0 < fid - last <= 15:
            out.append(((fid - last) << 4) | t)
        else:
            out.append(t)
            _varint(out, (fid << 1) ^ (fid >> 63))
        if t not in (_BOOL_TRUE, _BOOL_FALSE):
            _encode_value(out, t, v)
        last = fid
    out.append(0)


def _get(fields: list[list], fid: int, default: Any = None) -> Any:
    return next((v for f, _, v in fields if f == fid), default)


def _set(fields: list[list], fid: int, t: int, value: Any) -> None:
    for f in fields:
        if f[0] == fid:
            f[1], f[2] = t, value
            return
    fields.append([fid, t, value])
    fields.sort(key=lambda f: f[0])


def encode_struct(fields: list[list]) -> bytes:
    out = bytearray()
    _encode_struct(out, fields)
    return bytes(out)


def read_footer(data: bytes | memoryview) -> tuple[list[list], int]:
    """A Parquet file's decoded FileMetaData and where the footer starts."""
    if bytes(data[:4]) != b"PAR1" or bytes(data[-4:]) != b"PAR1":
        msg = "not a Parquet file"
        raise ValueError(msg)
    n = struct.unpack("<i", bytes(data[-8:-4]))[0]
    start = len(data) - 8 - n
    return _Decoder(bytes(data[start:len(data) - 8])).struct(), start


# --- the list columns' data pages -------------------------------------------------------------------
_PAGE_VALUES = 1 << 18  # ~1 MiB of int32 per data page, as Arrow's default page size
_PHYSICAL = {np.dtype(np.int32): 1, np.dtype(np.int64): 2, np.dtype(np.float32): 4, np.dtype(np.float64): 5}
_RLE, _PLAIN, _DATA_PAGE = 3, 0, 0


def _rle(counts: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RLE runs (``counts[i]`` times ``values[i]``, all counts > 0) of the RLE/bit-packed hybrid:
    varint(count << 1), then the value in one byte (levels here have bit widths 1 and 2).
    Returns the bytes and where each run starts (and the end)."""
    v = counts.astype(np.uint64) << np.uint64(1)
    nbytes = np.ones(v.shape, np.int64)
    for k in range(1, 10):
        nbytes += v >= np.uint64(1 << (7 * k))
    starts = np.zeros(v.size + 1, np.int64)
    np.cumsum(nbytes + 1, out=starts[1:])
    out = np.zeros(int(starts[-1]), np.uint8)
    for k in range(int(nbytes.max(initial=0))):
        at = nbytes > k
        byte = (v[at] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (nbytes[at] - 1 > k).astype(np.uint64) << np.uint64(7)
        out[starts[:-1][at] + k] = byte | more
    out[starts[:-1] + nbytes] = values
    return out, starts


def _rep_levels(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: one 0 (a new list), then ``L - 1`` ones; an empty list is a single 0. Returns the bytes of
    all rows and where each row's start (and the end), so that a page's levels are a slice."""
    runs = np.stack([np.ones_like(lengths), np.maximum(lengths - 1, 0)], axis=1).ravel()
    values = np.tile(np.array([0, 1], np.uint8), len(lengths))
    first = np.cumsum(np.concatenate([[0], np.where(lengths > 1, 2, 1)]))  # each row's first run
    keep = runs > 0
    out, starts = _rle(runs[keep], values[keep])
    return out, starts[first]


def _def_levels(lengths: np.ndarray, *, empty: int, present: int) -> bytes:
    """``present`` per value, ``empty`` per empty list; consecutive rows of one kind are one run (a shard
    without empty cells: one run per page)."""
    has = lengths > 0
    if has.all():  # one run
        out = bytearray()
        _varint(out, int(lengths.sum()) << 1)
        out.append(present)
        return bytes(out)
    seg = np.flatnonzero(np.concatenate([[True], has[1:] != has[:-1]]))
    counts = np.add.reduceat(np.where(has, lengths, 1), seg)
    return _rle(counts, np.where(has[seg], present, empty).astype(np.uint8))[0].tobytes()


def _page(lengths: np.ndarray, rep: bytes, values: list[memoryview], n_values: int, *,
          defs: tuple[int, int]) -> tuple[bytes, list[memoryview], int]:
    """One version 1 data page of whole rows: header and levels (``rep``: the rows' repetition levels), the
    plain values (not copied), and its number of levels. ``defs``: the definition levels of an empty list
    and of a value."""
    deff = _def_levels(lengths, empty=defs[0], present=defs[1])
    levels = struct.pack("<i", len(rep)) + rep + struct.pack("<i", len(deff)) + deff
    size = len(levels) + sum(v.nbytes for v in values)
    n_levels = n_values + int((lengths == 0).sum())
    header = encode_struct([
        [1, _I32, _DATA_PAGE], [2, _I32, size], [3, _I32, size],
        [5, _STRUCT, [[1, _I32, n_levels], [2, _I32, _PLAIN], [3, _I32, _RLE], [4, _I32, _RLE]]]])
    return header + levels, values, n_levels


class _ListColumn:
    """A list column's rows as (offsets into its chunks' values) and the values' buffers, zero-copy."""

    def __init__(self, col: pa.ChunkedArray, defs: tuple[int, int]) -> None:
        self.defs = defs
        offsets = [arrow.to_numpy(ch.offsets).astype(np.int64) for ch in col.chunks]
        self.chunks = [arrow.to_numpy(ch.values) for ch in col.chunks]
        none = np.zeros(0, np.int64)
        self.lengths = np.concatenate([none, *(np.diff(o) for o in offsets)])
        self.starts = np.concatenate([none, *(o[:-1] for o in offsets)])  # into the row's chunk's values
        self.row_chunk = np.concatenate([none, *(np.full(len(o) - 1, i) for i, o in enumerate(offsets))])
        self.dtype = self.chunks[0].dtype if self.chunks else np.dtype(np.int32)
        self.rep, self.rep_at = _rep_levels(self.lengths)

    def slices(self, r0: int, r1: int) -> list[memoryview]:
        """The values of rows ``r0:r1`` as views (one per source chunk they span)."""
        out = []
        r = r0
        while r < r1:
            c = int(self.row_chunk[r])
            end = r1 if int(self.row_chunk[r1 - 1]) == c else int(np.searchsorted(self.row_chunk, c, "right"))
            lo = int(self.starts[r])
            hi = int(self.starts[end - 1] + self.lengths[end - 1])
            if hi > lo:
                out.append(memoryview(self.chunks[c][lo:hi]).cast("B"))
            r = end
        return out

    def pages(self, r0: int, r1: int) -> list[tuple[bytes, list[memoryview], int]]:
        """Pages of rows ``r0:r1``, each of whole rows and about ``_PAGE_VALUES`` values."""
        out = []
        ends = np.cumsum(self.lengths[r0:r1])
        r = r0
        while r < r1:
            base = int(ends[r - r0 - 1]) if r > r0 else 0
            stop = int(np.searchsorted(ends, base + _PAGE_VALUES, "right")) + r0
            stop = min(max(stop, r + 1), r1)
            n_values = int(ends[stop - r0 - 1]) - base
            rep = self.rep[self.rep_at[r]:self.rep_at[stop]].tobytes()
            out.append(_page(self.lengths[r:stop], rep, self.slices(r, stop), n_values, defs=self.defs))
            r = stop
        return out


def _direct_lists(table: pa.Table) -> list[str] | None:
    """The list columns this writer covers, or None when the table needs pyarrow's writer throughout."""
    names = []
    for field in table.schema:
        t = field.type
        if pa.types.is_list(t):
            if arrow.numpy_dtype(t.value_type) not in _PHYSICAL:
                return None
            col = table.column(field.name)
            if col.null_count or any(ch.values.null_count for ch in col.chunks):
                return None
            names.append(field.name)
        elif pa.types.is_nested(t) or pa.types.is_dictionary(t):
            return None
    return names


_TEMPLATES: dict[tuple[pa.Schema, str], list[list]] = {}


def _template(table: pa.Table, options: dict[str, Any]) -> list[list]:
    """pyarrow's FileMetaData for none of ``table``'s rows: the schema elements, ``ARROW:schema`` and column
    orders this writer copies (once per schema and options)."""
    key = (table.schema, repr(sorted(options.items())))
    if key not in _TEMPLATES:
        buf = pa.BufferOutputStream()
        pq.write_table(table.slice(0, 0), buf, **options)  # not Schema.empty_table(): that imports pandas
        _TEMPLATES[key] = read_footer(buf.getvalue().to_pybytes())[0]
    return _TEMPLATES[key]


_REQUIRED, _REPEATED = 0, 2


def _leaves(meta: list[list]) -> list[tuple[tuple[str, ...], list[int]]]:
    """Leaf columns in schema order: their path and the repetition type of each element on it."""
    elements = _get(meta, 2)[1]
    leaves, stack = [], []  # stack of [name, repetition, children left]
    for el in elements[1:]:
        name, rep, children = _get(el, 4).decode(), _get(el, 3, _REQUIRED), _get(el, 5, 0)
        if children:
            stack.append([name, rep, children])
            continue
        leaves.append(((*[s[0] for s in stack], name), [*[s[1] for s in stack], rep]))
        while stack:
            stack[-1][2] -= 1
            if stack[-1][2]:
                break
            stack.pop()
    return leaves


def _list_defs(reps: list[int]) -> tuple[int, int] | None:
    """Definition levels of an empty list and of a value, for a list leaf's path (group, repeated, leaf)."""
    if len(reps) != 3 or reps[1] != _REPEATED:
        return None
    empty = int(reps[0] != _REQUIRED)
    return empty, empty + 1 + int(reps[2] != _REQUIRED)


def write_table(table: pa.Table, sink: Any, **options: Any) -> None:
    """``pyarrow.parquet.write_table(table, sink, **options)``, the list columns written directly.

    ``options`` as for pyarrow; lists are written uncompressed and plain whatever they say, so tables
    asking for compression or dictionary encoding go to pyarrow entirely.
    """
    lists = _direct_lists(table)
    if not lists or options.get("compression", "snappy") not in ("none", None) or options.get("use_dictionary"):
        pq.write_table(table, sink, **options)
        return
    stats = options.get("write_statistics", True)
    if stats is True or (isinstance(stats, (list, tuple)) and set(stats) & set(lists)):
        pq.write_table(table, sink, **options)  # statistics of a list column: pyarrow computes them
        return
    rest = table.drop_columns(lists)
    template = _template(table, options)
    leaves = _leaves(template)
    defs = {path[0]: _list_defs(reps) for path, reps in leaves if path[0] in lists}
    if not rest.num_columns or None in defs.values():  # no column to count the row groups' rows
        pq.write_table(table, sink, **options)
        return
    buf = pa.BufferOutputStream()
    pq.write_table(rest, buf, **options)
    data = buf.getvalue()
    meta, footer_at = read_footer(memoryview(data))
    cols = {name: _ListColumn(table.column(name), defs[name]) for name in lists}

    sink.write(memoryview(data)[:footer_at])
    pos = footer_at
    row0 = 0
    for rg in _get(meta, 4, (_STRUCT, []))[1]:
        n_rows = _get(rg, 3)
        old = {tuple(p.decode() for p in _get(_get(c, 3), 3)[1]): c for c in _get(rg, 1)[1]}
        chunks, added = [], 0
        for path, _ in leaves:
            if path[0] not in cols:
                chunks.append(old[path])
                continue
            col = cols[path[0]]
            start, n_levels, size = pos, 0, 0
            for head, vals, n in col.pages(row0, row0 + n_rows):
                sink.write(head)
                for v in vals:
                    sink.write(v)
                page = len(head) + sum(v.nbytes for v in vals)
                pos, size, n_levels = pos + page, size + page, n_levels + n
            added += size
            chunks.append([[2, _I64, start], [3, _STRUCT, [
                [1, _I32, _PHYSICAL[col.dtype]], [2, _LIST, (_I32, [_PLAIN, _RLE])],
                [3, _LIST, (_BINARY, [p.encode() for p in path])], [4, _I32, 0], [5, _I64, n_levels],
                [6, _I64, size], [7, _I64, size], [9, _I64, start]]]])
        _set(rg, 1, _LIST, (_STRUCT, chunks))
        _set(rg, 2, _I64, _get(rg, 2, 0) + added)
        if _get(rg, 6) is not None:
            _set(rg, 6, _I64, _get(rg, 6) + added)
        _set(rg, 5, _I64, min(_get(_get(c, 3), 9) for c in chunks))  # the row group's first page
        row0 += n_rows
    if row0 != table.num_rows:
        msg = f"row groups hold {row0} rows, the table {table.num_rows}"
        raise AssertionError(msg)
    for fid in (2, 5, 7):  # schema, key-value metadata (ARROW:schema), column orders: the whole table's
        value = _get(template, fid)
        if value is not None:
            _set(meta, fid, _LIST, value)
    footer = encode_struct(meta)
    sink.write(footer)
    sink.write(struct.pack("<i", len(footer)) + b"PAR1")
