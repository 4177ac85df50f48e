"""The one cell-token source: same cells from a directory, a table, a Parquet file and lists; views,
selection by metadata, config, values/species, and refusal of unfinished, empty or damaged datasets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scfm_fast._errors import InputFileError, StoreError, UsageError
from scfm_fast.store import TokenStore, read_table
from scfm_fast.store.cells import open_cells


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, pbmc_path):
    """The bundled PBMC cells tokenized in several shards, with a metadata column."""
    from scfm_fast.cli import main

    d = tmp_path_factory.mktemp("cells") / "tok"
    assert main(["tokenize", str(pbmc_path), "--out", str(d), "--max-len", "96", "--chunk-size", "48",
                 "--obs-columns", "n_genes"]) == 0
    return d


def _parquet_cells(d):
    tab = read_table(d)
    return tab, [np.asarray(c) for c in tab.column("input_ids").to_pylist()]


def test_directory_cells_equal_the_shards_and_the_packed_store(tokens):
    tab, cells = _parquet_cells(tokens)
    src = open_cells(tokens)
    store = TokenStore(tokens)
    assert len(src) == tab.num_rows == len(store) == 200 and len(list(tokens.glob("part-*"))) > 1
    np.testing.assert_array_equal(src.lengths, tab.column("length").to_numpy())
    np.testing.assert_array_equal(src.cell_index, tab.column("cell_index").to_numpy())
    np.testing.assert_array_equal(src.file_index, tab.column("file_index").to_numpy())
    assert src.cell_id.tolist() == tab.column("cell_id").to_pylist()
    order = [7, 0, 199, 7, -1]
    for got, i in zip(src.take(order), order):
        np.testing.assert_array_equal(got, cells[i])
        assert got.dtype == np.int64
    ids, cu = src.take_packed(order)
    assert cu.dtype == np.int32 and cu[-1] == ids.size
    np.testing.assert_array_equal(ids, np.concatenate([cells[i] for i in order]))
    np.testing.assert_array_equal(src[3], store[3])
    with pytest.raises(IndexError, match="cell 200 out of range"):
        src.take([200])


def test_config_comes_from_the_manifest(tokens):
    src = open_cells(tokens)
    man = json.loads((tokens / "__scfm__/manifest.json").read_text())
    assert src.manifest["config_hash"] == man["config_hash"]
    assert src.special_tokens == {"<pad>": 0, "<mask>": 1} and src.special_token_ids == (0, 1)
    assert src.dictionary_hash == man["config"]["dictionary_hashes"]["token_dictionary"]
    assert src.orthologs is None and src.preset == "geneformer-v1" and src.max_len == 96
    assert not src.has_values and src.species is None


def test_parts_and_selection_are_views(tokens):
    tab, cells = _parquet_cells(tokens)
    src = open_cells(tokens)
    parts = list(src.parts(64))
    assert [len(p) for p in parts] == [64, 64, 64, 8]
    assert all(p._base.tokens is src._base.tokens for p in parts)  # no token copied until taken
    np.testing.assert_array_equal(np.concatenate([p.rows for p in parts]), np.arange(200))
    np.testing.assert_array_equal(parts[2].take([0])[0], cells[128])
    assert [i for i, _ in src.iter_cells(part_size=50)] == tab.column("cell_index").to_pylist()
    # select: by value (compared as strings) or a list of values; reads only that column
    n_genes = tab.column("n_genes").to_numpy()
    want = sorted({int(v) for v in n_genes[:3]})
    sel = src.select(where={"n_genes": want})
    expect = np.flatnonzero(np.isin(n_genes, want))
    np.testing.assert_array_equal(sel.rows, expect)
    np.testing.assert_array_equal(sel.cell_index, tab.column("cell_index").to_numpy()[expect])
    for got, i in zip(sel.take(np.arange(len(sel))), expect):
        np.testing.assert_array_equal(got, cells[i])
    assert sel.columns(["cell_id"]).column("cell_id").to_pylist() == [tab.column("cell_id")[i].as_py() for i in expect]
    sub = sel.subset([1, 0])  # a view of a view
    np.testing.assert_array_equal(sub.rows, expect[[1, 0]])
    one = src.select(where={"n_genes": str(int(n_genes[5]))})
    assert 5 in one.rows.tolist()
    with pytest.raises(UsageError, match="values seen"):
        src.select(where={"n_genes": "-7"})
    with pytest.raises(InputFileError, match="no metadata column 'disease'"):
        src.select(where={"disease": "dcm"})


def test_tokens_outside_a_vocabulary_name_the_cell(tokens):
    src = open_cells(tokens)
    big = int(src.take_packed(np.arange(len(src)))[0].max())
    assert src.first_token_outside(big + 1) is None
    pos, tok = src.first_token_outside(big)
    assert tok == big and big in src[pos] and all(big not in c for c in src.take(np.arange(pos)))
    sel = src.subset(np.arange(pos, len(src)))
    assert sel.first_token_outside(big) == (0, big)
    # small blocks: the answer does not depend on where the blocks fall
    assert src.first_token_outside(big, block=7) == (pos, big)
    assert src.subset(np.arange(len(src))).first_token_outside(big, block=7) == (pos, big)


def test_table_parquet_file_and_lists_give_the_same_cells(tmp_path):
    pytest.importorskip("anndata")
    from scfm_fast import tokenize_anndata
    from scfm_fast.vocab import GeneVocab
    from tests._data import make_counts_adata

    table = tokenize_anndata(make_counts_adata(GeneVocab.load(), n_cells=12), max_len=20)
    pq.write_table(table, tmp_path / "cells.parquet")
    cells = [np.asarray(c) for c in table.column("input_ids").to_pylist()]
    for src in (open_cells(table), open_cells(tmp_path / "cells.parquet"), open_cells(cells)):
        assert len(src) == len(cells)
        for got, want in zip(src.take(np.arange(len(cells))), cells):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(src.lengths, [c.size for c in cells])
    t = open_cells(tmp_path / "cells.parquet")
    assert t.special_token_ids == (0, 1) and t.preset == "geneformer-v1" and t.max_len == 20
    np.testing.assert_array_equal(t.cell_index, table.column("cell_index").to_numpy())
    assert open_cells(cells).config == {} and open_cells(cells).special_token_ids is None
    assert open_cells(cells, config={"special_tokens": {"<pad>": 0}}).special_token_ids == (0,)
    # a sliced table (non-zero list offsets) reads the right cells
    np.testing.assert_array_equal(open_cells(table.slice(3, 2)).take([1])[0], cells[4])


def test_values_and_species_are_exposed_when_present(tokens, tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(tokens, d)
    n_tokens = TokenStore(d).tokens.shape[0]
    vals = np.arange(n_tokens, dtype=np.float32) / 7
    np.save(d / "__scfm__/packed/values.npy", vals)
    src = open_cells(d)
    assert src.has_values
    lo = int(np.asarray(TokenStore(d).offsets)[5])
    np.testing.assert_array_equal(src.take_values([5])[0], vals[lo:lo + src.lengths[5]])
    assert src.species is None
    np.save(d / "__scfm__/packed/species.npy", (np.arange(len(src)) % 2).astype(np.int8))
    assert open_cells(d).subset([3, 4, 5]).species.tolist() == [1, 0, 1]
    np.save(d / "__scfm__/packed/values.npy", vals[:-1])
    with pytest.raises(StoreError, match="entries for"):
        open_cells(d)
    table = pa.table({"input_ids": pa.array([[5, 6], [7]], pa.list_(pa.int32())), "species": ["human", "mouse"],
                      "values": pa.array([[1.5, 2.5], [3.5]], pa.list_(pa.float32()))})
    src = open_cells(table)
    assert src.species.tolist() == ["human", "mouse"] and src.take_values([1])[0].tolist() == [3.5]
    with pytest.raises(StoreError, match="no per-token values"):
        open_cells([[5]]).take_values([0])


def test_unfinished_empty_and_damaged_datasets_are_refused(tokens, tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        open_cells(tmp_path / "nope")
    half = tmp_path / "half"
    shutil.copytree(tokens, half)
    man = half / "__scfm__/manifest.json"
    man.write_text(man.read_text().replace('"complete"', '"in_progress"'))
    with pytest.raises(StoreError, match="unfinished.*--resume"):
        open_cells(half)
    # a recorded shard gone, or replaced by one of other cells: the shards no longer hold the manifest's cells
    lost = tmp_path / "lost"
    shutil.copytree(tokens, lost)
    gone = sorted(lost.glob("part-*.parquet"))[1]
    gone.unlink()
    with pytest.raises(StoreError, match=f"missing \\({gone.name}\\).*--resume"):
        open_cells(lost)
    first = sorted(lost.glob("part-*.parquet"))[0]
    pq.write_table(pq.read_table(first).slice(0, 10), gone)
    with pytest.raises(StoreError, match="hold 162 cells but the manifest records 200"):
        open_cells(lost)
    # a stray Parquet file that no shard record names is not read as cells
    stray = tmp_path / "stray"
    shutil.copytree(tokens, stray)
    shutil.copy(first, stray / "part-0009-000000000000.parquet")
    assert len(open_cells(stray)) == 200
    # a packed store of another size than the shards
    short = tmp_path / "short"
    shutil.copytree(tokens, short)
    offs = np.load(short / "__scfm__/packed/offsets.npy")
    np.save(short / "__scfm__/packed/offsets.npy", offs[:-1])
    with pytest.raises(StoreError, match="packed store"):
        open_cells(short)
    # a complete dataset of 0 cells
    empty = tmp_path / "empty"
    (empty / "__scfm__/packed").mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": pa.array([], pa.list_(pa.int32()))}), empty / "part-0000-000000000000.parquet")
    man = {"status": "complete", "n_cells": 0, "config": {}, "shards": []}
    (empty / "__scfm__/manifest.json").write_text(json.dumps(man))
    for name, arr in (("tokens", np.zeros(0, np.uint16)), ("offsets", np.zeros(1, np.int64)),
                      ("cell_index", np.zeros(0, np.int64)), ("file_index", np.zeros(0, np.int32))):
        np.save(empty / f"__scfm__/packed/{name}.npy", arr)
    with pytest.raises(StoreError, match="holds no cells"):
        open_cells(empty)
    assert len(open_cells(empty, allow_empty=True)) == 0
    with pytest.raises(StoreError, match="holds no cells"):
        open_cells(pa.table({"input_ids": pa.array([], pa.list_(pa.int32()))}))


def test_a_directory_without_packed_store_reads_its_shards(tokens, tmp_path):
    d = tmp_path / "nopack"
    shutil.copytree(tokens, d)
    shutil.rmtree(d / "__scfm__/packed")
    a, b = open_cells(tokens), open_cells(d)
    assert len(a) == len(b)
    for x, y in zip(a.take(np.arange(len(a))), b.take(np.arange(len(b)))):
        np.testing.assert_array_equal(x, y)
    assert b.select(where={"n_genes": a.columns(["n_genes"]).column("n_genes")[0].as_py()}).rows[0] == 0
