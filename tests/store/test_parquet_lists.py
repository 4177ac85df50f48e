"""Shards whose list columns are written directly (:mod:`scfm_fast.store._parquet_lists`): what pyarrow
and ``datasets`` read back equals the table and pyarrow's own file (schema and metadata included), the
pages are laid out as the Parquet format says (checked by walking them here), and what the writer does
not cover goes to pyarrow."""

from __future__ import annotations

import io
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scfm_fast.store import _parquet_lists as pl
from scfm_fast.store.packed import parquet_options


def _lists(lengths: np.ndarray, values: np.ndarray, *, item: pa.Field | None = None) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    typ = pa.list_(item) if item is not None else None
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[: offsets[-1]], type=item and item.type),
                                    type=typ)


def _shard(n: int, rng, *, empty: bool = False, chunks: int = 1) -> pa.Table:
    """A tokenized-shard-like table: token lists, GeneCompass-like values, scalar and obs columns."""
    parts = []
    for _ in range(chunks):
        lengths = rng.integers(0 if empty else 1, 60, n)
        toks = rng.integers(3, 25_000, int(lengths.sum()) + 1).astype(np.int32)
        parts.append(pa.table({
            "input_ids": _lists(lengths, toks),
            "length": pa.array(lengths.astype(np.int32)),
            "cell_id": pa.array([f"c{i}" for i in range(n)]),
            "values": _lists(lengths, rng.random(toks.size).astype(np.float32)),
            "counts": _lists(lengths, rng.random(toks.size)),  # float64 values
            "label": pa.array([None if i % 7 == 0 else f"t{i % 3}" for i in range(n)], type=pa.string()),
            "score": pa.array([None if i % 5 == 0 else i * 0.5 for i in range(n)], type=pa.float64()),
        }, metadata={b"scfm": b"{\"x\": 1}"}))
    return pa.concat_tables(parts)


def _write(table: pa.Table, fn) -> bytes:
    buf = io.BytesIO()
    fn(table, buf, **parquet_options(table.schema))
    return buf.getvalue()


def _walk_pages(data: bytes, chunk: pq.ColumnChunkMetaData) -> int:
    """Decode every page header of a column chunk from the spec; the pages must fill the chunk exactly.
    Returns the number of levels (values + empty lists) the pages hold."""
    pos, end, levels = chunk.data_page_offset, chunk.data_page_offset + chunk.total_compressed_size, 0
    while pos < end:
        dec = pl._Decoder(data[pos:])
        header = dec.struct()
        assert pl._get(header, 1) == 0  # a data page (version 1)
        size = pl._get(header, 3)
        assert size == pl._get(header, 2)  # uncompressed
        body = data[pos + dec.pos: pos + dec.pos + size]
        rep_len = struct.unpack_from("<i", body, 0)[0]
        def_len = struct.unpack_from("<i", body, 4 + rep_len)[0]
        assert 8 + rep_len + def_len <= size
        levels += pl._get(pl._get(header, 5), 1)
        pos += dec.pos + size
    assert pos == end
    return levels


@pytest.mark.parametrize(("n", "empty", "chunks"), [(1, False, 1), (57, True, 3), (20_000, False, 2), (0, False, 1)])
def test_read_back_equals_the_table_and_pyarrows_file(n, empty, chunks, monkeypatch):
    monkeypatch.setattr(pl, "_PAGE_VALUES", 4_000)  # several pages per row group, pages of whole rows
    table = _shard(n, np.random.default_rng(n), empty=empty, chunks=chunks)
    ours, theirs = _write(table, pl.write_table), _write(table, pq.write_table)
    got, want = pq.read_table(io.BytesIO(ours)), pq.read_table(io.BytesIO(theirs))
    assert got.equals(table.combine_chunks())
    assert got.schema.equals(want.schema, check_metadata=True)
    meta = pq.ParquetFile(io.BytesIO(ours)).metadata
    assert meta.num_rows == table.num_rows and meta.num_row_groups == pq.ParquetFile(io.BytesIO(theirs)).metadata.num_row_groups
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            if col.path_in_schema.split(".")[0] in ("input_ids", "values", "counts"):
                assert not col.is_stats_set and col.compression == "UNCOMPRESSED"
                assert _walk_pages(ours, col) == col.num_values
        assert pq.ParquetFile(io.BytesIO(ours)).read_row_group(g).equals(
            pq.ParquetFile(io.BytesIO(theirs)).read_row_group(g))
    # small batches cross the pages and row groups mid-way; one column alone
    batches = list(pq.ParquetFile(io.BytesIO(ours)).iter_batches(batch_size=7, columns=["input_ids", "counts"]))
    if batches:
        assert pa.Table.from_batches(batches).equals(table.select(["input_ids", "counts"]).combine_chunks())


def test_datasets_reads_a_shard(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = _shard(300, np.random.default_rng(1), empty=True)
    (tmp_path / "s.parquet").write_bytes(_write(table, pl.write_table))
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "s.parquet"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert ds["input_ids"] == table.column("input_ids").to_pylist()
    assert ds["values"] == table.column("values").to_pylist()


def test_required_fields_get_their_own_levels():
    """Non-nullable list and element: the definition levels of an empty list and of a value are 0 and 1."""
    item = pa.field("item", pa.int32(), nullable=False)
    lengths = np.array([2, 0, 3, 1])
    ids = _lists(lengths, np.arange(10, dtype=np.int32), item=item)
    schema = pa.schema([pa.field("input_ids", ids.type, nullable=False), pa.field("n", pa.int64())])
    table = pa.Table.from_arrays([ids, pa.array(np.arange(4))], schema=schema)
    got = pq.read_table(io.BytesIO(_write(table, pl.write_table)))
    assert got.equals(pq.read_table(io.BytesIO(_write(table, pq.write_table))))


@pytest.mark.parametrize("case", ["null list", "null value", "only lists", "compressed", "list statistics"])
def test_tables_it_does_not_cover_go_to_pyarrow(case, monkeypatch):
    table = _shard(20, np.random.default_rng(2))
    opts = parquet_options(table.schema)
    if case == "null list":
        table = table.set_column(0, "input_ids", pa.array([None, *table.column("input_ids").to_pylist()[1:]],
                                                          type=pa.list_(pa.int32())))
    elif case == "null value":
        table = table.set_column(0, "input_ids", pa.array([[1, None], *table.column("input_ids").to_pylist()[1:]],
                                                          type=pa.list_(pa.int32())))
    elif case == "only lists":
        table = table.select(["input_ids"])
    elif case == "compressed":
        opts = {**opts, "compression": "zstd"}
    else:
        opts = {**opts, "write_statistics": True}
    calls = []
    monkeypatch.setattr(pl, "_ListColumn", lambda *a: calls.append(a))  # the direct path is never taken
    buf = io.BytesIO()
    pl.write_table(table, buf, **opts)
    assert not calls
    assert pq.read_table(io.BytesIO(buf.getvalue())).equals(table.combine_chunks())


def test_footers_round_trip_through_the_thrift_codec():
    table = _shard(50, np.random.default_rng(3))
    for data in (_write(table, pq.write_table), _write(table, pl.write_table)):
        meta, at = pl.read_footer(data)
        assert pl.encode_struct(meta) == data[at:-8]
    with pytest.raises(ValueError, match="not a Parquet file"):
        pl.read_footer(b"PAR1 nope")


def test_a_sliced_table_is_written_from_its_own_rows():
    """Sliced list arrays share their parent's values buffer: only the slice's values are written."""
    table = _shard(40, np.random.default_rng(4), empty=True).slice(7, 20)
    assert pq.read_table(io.BytesIO(_write(table, pl.write_table))).equals(table.combine_chunks())
