"""Arrow schema and manifest layout of a token dataset directory.

A token dataset directory holds::

    part-FFFF-SSSSSSSSSSSS.parquet   shards: input file FFFF, source rows from SSSS...
    __scfm__/manifest.json           config, inputs, dictionary hashes, per-shard counts, status
    __scfm__/manifest.shards.jsonl   while a run is unfinished: one shard record per line, folded
                                     into manifest.json on every rewrite and at finalize
    __scfm__/parts/                  while unfinished: each shard's packed part (.npy arrays)
    __scfm__/packed/tokens/part-FFFF-SSSSSSSSSSSS.npy   each shard's tokens (uint16 when the vocabulary
                                     fits, else int32); in shard order they are the flat token array
    __scfm__/packed/offsets.npy      int64, n_cells + 1: cell i is tokens[offsets[i]:offsets[i+1]]
    __scfm__/packed/{cell_index,file_index}.npy   source row and input file of each packed cell
    __scfm__/packed/values/part-....npy   float32, aligned with tokens (GeneCompass datasets only)
    __scfm__/packed/species.npy   int8 per packed cell, 0 human / 1 mouse (GeneCompass datasets only)

The per-token arrays are segments, one per shard with tokens (hard links of the run's shard parts: no
copy at finalize), and the manifest's ``packed.layout`` says ``"segments"``.  Datasets of format
``scfm_fast.tokens/1`` hold one ``tokens.npy`` (and ``values.npy``) instead; both layouts are read.

``pyarrow.dataset.dataset(DIR)`` skips names starting with ``_`` or ``.``, and Hugging Face
``datasets.load_dataset("parquet", data_dir=DIR)`` skips ``__*__`` folders and dot-files, so both read
exactly the shards; a shard in progress is a hidden dot-file until it is renamed into place.

Shard columns: ``input_ids`` (list<int32>), ``length`` (int32), ``cell_index`` (int64 row in the
source file), ``file_index`` (int32 index into ``manifest["inputs"]``), ``cell_id`` (obs name), then
the requested obs columns.  GeneCompass datasets add ``values`` (list<float32>, aligned with
``input_ids``) and ``species`` (int8: 0 human, 1 mouse).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

FORMAT = "scfm_fast.tokens/2"
#: ``manifest["packed"]["layout"]`` of a store whose per-token arrays are per-shard segments
SEGMENTS = "segments"
META_DIR = "__scfm__"
MANIFEST = f"{META_DIR}/manifest.json"
PACKED_DIR = f"{META_DIR}/packed"
PARTS_DIR = f"{META_DIR}/parts"  # per-shard packed parts while a run is in progress
BASE_COLUMNS = ("input_ids", "length", "cell_index", "file_index", "cell_id")


def shard_name(file_index: int, start: int) -> str:
    return f"part-{file_index:04d}-{start:012d}.parquet"


def base_schema() -> pa.Schema:
    return pa.schema([
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("length", pa.int32()),
        pa.field("cell_index", pa.int64()),
        pa.field("file_index", pa.int32()),
        pa.field("cell_id", pa.string()),
    ])


#: schema-metadata key under which an in-memory token table records its tokenizer config
TABLE_CONFIG_KEY = b"scfm_fast.config"


def with_table_config(table: pa.Table, config: dict[str, Any]) -> pa.Table:
    """``table`` carrying the tokenizer ``config`` (special tokens, dictionary hashes, orthologs) in its
    schema metadata, as a token dataset directory carries it in its manifest."""
    meta = dict(table.schema.metadata or {})
    meta[TABLE_CONFIG_KEY] = json.dumps(config, default=str).encode()
    return table.replace_schema_metadata(meta)


def table_config(table: pa.Table) -> dict[str, Any]:
    """The tokenizer config recorded by :func:`with_table_config` (``{}`` if none)."""
    raw = (table.schema.metadata or {}).get(TABLE_CONFIG_KEY)
    return json.loads(raw) if raw else {}
