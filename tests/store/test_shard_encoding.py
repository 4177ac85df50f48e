"""Shards use the measured Parquet settings and stay readable by pyarrow and Hugging Face datasets."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scfm_fast.store import ShardedTokenWriter, TokenStore


def _genecompass_shard(rng, lengths):
    toks = [rng.integers(2, 60_000, n).astype(np.int32) for n in lengths]
    vals = [rng.random(n, dtype=np.float32) for n in lengths]
    return pa.table({
        "input_ids": pa.array(toks, type=pa.list_(pa.int32())),
        "length": pa.array(np.array(lengths, dtype=np.int32)),
        "cell_index": pa.array(np.arange(len(lengths), dtype=np.int64)),
        "file_index": pa.array(np.zeros(len(lengths), dtype=np.int32)),
        "cell_id": pa.array([f"c{i}" for i in range(len(lengths))]),
        "values": pa.array(vals, type=pa.list_(pa.float32())),
        "species": pa.array(np.zeros(len(lengths), dtype=np.int8)),
    }), toks, vals


def test_shard_encoding_and_readers(tmp_path):
    rng = np.random.default_rng(0)
    tab, toks, vals = _genecompass_shard(rng, [5, 0, 3, 2048])
    w = ShardedTokenWriter(tmp_path / "o", config={}, vocab_size=60_000)
    w.write_shard(tab, file_index=0, start=0, stop=4, stats={"n_tokens": 5 + 3 + 2048})
    w.finalize()
    shard = next((tmp_path / "o").glob("part-*.parquet"))
    meta = pq.ParquetFile(shard).metadata
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            assert col.compression == "UNCOMPRESSED", col.path_in_schema
            assert "RLE_DICTIONARY" not in col.encodings and "PLAIN_DICTIONARY" not in col.encodings
            # min/max only where a reader can use them (scalar columns)
            assert col.is_stats_set == (not col.path_in_schema.endswith(".element")), col.path_in_schema
    got = pq.read_table(shard)
    assert got.equals(tab)
    datasets = pytest.importorskip("datasets")
    hf = datasets.load_dataset("parquet", data_files=str(shard), split="train", cache_dir=str(tmp_path / "hf"))
    assert hf.num_rows == 4
    for i in range(4):
        assert hf[i]["input_ids"] == toks[i].tolist()
        np.testing.assert_array_equal(np.asarray(hf[i]["values"], dtype=np.float32), vals[i])
    store = TokenStore(tmp_path / "o")
    for i in range(4):
        np.testing.assert_array_equal(store[i], toks[i])
