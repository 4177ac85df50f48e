"""filter_pass encodings, resume after damage (packed store or a shard gone), finalize's shard checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scfm_fast._errors import InputFileError, StoreError
from scfm_fast.store import TokenStore, read_manifest, read_table
from scfm_fast.store import writer as writer_mod
from scfm_fast.tokenizer.medians import compute_gene_medians
from scfm_fast.tokenizer.pipeline import tokenize_corpus
from scfm_fast.vocab import GeneVocab
from tests._data import make_counts_adata

KEEP = np.array([i % 3 != 0 for i in range(45)])  # cells 0, 3, 6, ... are filtered out


@pytest.fixture(scope="module")
def adata():
    return make_counts_adata(GeneVocab.load(), n_cells=45, n_genes=70)


@pytest.fixture(scope="module")
def reference(adata, tmp_path_factory):
    """The dataset of the cells in KEEP, tokenized without any filter_pass column."""
    d = tmp_path_factory.mktemp("ref")
    a = adata.copy()
    a.obs = a.obs.drop(columns="filter_pass")
    a.obs["filter_pass"] = KEEP.astype(np.int64)
    a.write_h5ad(d / "c.h5ad")
    tokenize_corpus(d / "c.h5ad", d / "o", chunk_size=10, progress_bar=False)
    return read_table(d / "o")


@pytest.mark.parametrize("encode", [
    lambda k: k,  # bool
    lambda k: np.where(k, "True", "False").astype(object),
    lambda k: pd.Categorical(np.where(k, "True", "False")),
    lambda k: np.where(k, "true", "FALSE").astype(object),
    lambda k: k.astype(np.float32),
    lambda k: pd.array(k, dtype="boolean"),  # anndata's nullable-boolean encoding
    lambda k: pd.array(k.astype(np.int64), dtype="Int64"),  # nullable-integer
], ids=["bool", "str", "categorical", "lowercase", "float01", "nullable-bool", "nullable-int"])
def test_filter_pass_encodings_keep_the_same_cells(tmp_path, adata, reference, encode):
    a = adata.copy()
    a.obs["filter_pass"] = encode(KEEP)
    a.write_h5ad(tmp_path / "c.h5ad")
    tokenize_corpus(tmp_path / "c.h5ad", tmp_path / "o", chunk_size=10, progress_bar=False)
    tab = read_table(tmp_path / "o")
    assert tab.column("cell_index").equals(reference.column("cell_index"))
    assert tab.column("input_ids").equals(reference.column("input_ids"))
    med, rep = compute_gene_medians(tmp_path / "c.h5ad", progress_bar=False)
    assert rep["n_cells"] == int(KEEP.sum())


@pytest.mark.parametrize("values,shown", [
    (np.where(KEEP, "yes", "no").astype(object), "'no', 'yes'"),
    (pd.Categorical(np.where(KEEP, "pass", "fail")), "'fail', 'pass'"),
    (np.where(KEEP, 1, 2), "1, 2"),
    (pd.array(np.where(np.arange(KEEP.size) == 3, None, KEEP), dtype="boolean"), "False, None, True"),
], ids=["yes/no", "categorical", "1/2", "nullable-bool-with-NA"])
def test_other_filter_pass_values_are_refused(tmp_path, adata, values, shown):
    a = adata.copy()
    a.obs["filter_pass"] = values
    a.write_h5ad(tmp_path / "c.h5ad")
    for run in (lambda: tokenize_corpus(tmp_path / "c.h5ad", tmp_path / "o", progress_bar=False),
                lambda: compute_gene_medians(tmp_path / "c.h5ad", progress_bar=False)):
        with pytest.raises(InputFileError, match="c.h5ad: obs column 'filter_pass'") as e:
            run()
        assert shown in str(e.value)
    assert not (tmp_path / "o" / "__scfm__" / "manifest.json").exists() or \
        read_manifest(tmp_path / "o", require_complete=False)["status"] != "complete"


@pytest.fixture
def dataset(adata, tmp_path):
    adata.write_h5ad(tmp_path / "c.h5ad")
    tokenize_corpus(tmp_path / "c.h5ad", tmp_path / "ref", chunk_size=10, progress_bar=False)
    tokenize_corpus(tmp_path / "c.h5ad", tmp_path / "o", chunk_size=10, progress_bar=False)
    return tmp_path / "c.h5ad", tmp_path / "o", tmp_path / "ref"


def _same(out, ref):
    assert read_table(out).equals(read_table(ref))
    a, b = TokenStore(out), TokenStore(ref)
    for k in ("tokens", "offsets", "cell_index", "file_index"):
        np.testing.assert_array_equal(np.asarray(getattr(a, k)), np.asarray(getattr(b, k)))


def test_resume_rebuilds_a_deleted_packed_store_without_demoting(dataset, monkeypatch):
    src, out, ref = dataset
    shutil.rmtree(out / "__scfm__" / "packed")
    with pytest.raises(StoreError, match="--resume"):
        TokenStore(out)
    # a crash while rebuilding leaves the dataset marked complete (its shards are), never demoted
    def crash(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(writer_mod.ShardedTokenWriter, "_assemble", crash)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(src, out, chunk_size=10, resume=True, progress_bar=False)
    assert read_manifest(out)["status"] == "complete"
    monkeypatch.undo()
    man = tokenize_corpus(src, out, chunk_size=10, resume=True, progress_bar=False)
    assert man["status"] == "complete" and not man.get("already_complete")
    _same(out, ref)


def test_resume_redoes_a_shard_whose_file_is_gone(dataset):
    src, out, ref = dataset
    (out / "part-0000-000000000020.parquet").unlink()
    with pytest.raises(StoreError, match="missing.*--resume"):
        read_table(out)
    man = tokenize_corpus(src, out, chunk_size=10, resume=True, progress_bar=False)
    assert man["n_cells"] == read_manifest(ref)["n_cells"] and len(man["shards"]) == 5
    _same(out, ref)


def test_readers_compare_row_counts_with_the_manifest(dataset):
    _, out, _ = dataset
    man_path = out / "__scfm__" / "manifest.json"
    man = json.loads(man_path.read_text())
    man["n_cells"] += 1
    man_path.write_text(json.dumps(man))
    with pytest.raises(StoreError, match="manifest records"):
        read_table(out)
    with pytest.raises(StoreError, match="manifest records"):
        TokenStore(out)


def test_finalize_refuses_a_shard_that_does_not_match_its_record(dataset, monkeypatch):
    # what a second writer would leave: a Parquet shard with other cells than its packed part
    src, out, _ = dataset
    real = writer_mod.ShardedTokenWriter.write_shard

    def swap(self, table, **k):
        real(self, table, **k)
        if k["start"] == 10:
            t = table.set_column(1, "length", pa.array(table.column("length").to_numpy() // 2))
            pq.write_table(t, self.out / "part-0000-000000000010.parquet")

    monkeypatch.setattr(writer_mod.ShardedTokenWriter, "write_shard", swap)
    with pytest.raises(StoreError, match="part-0000-000000000010.parquet: holds .* rerun with --overwrite"):
        tokenize_corpus(src, out, chunk_size=10, overwrite=True, progress_bar=False)
    assert read_manifest(out, require_complete=False)["status"] == "in_progress"
    assert not list((out / "__scfm__").glob("*.tmp"))


def test_resume_redoes_a_damaged_shard_of_a_dataset_without_packed_store(dataset):
    src, out, ref = dataset
    shutil.rmtree(out / "__scfm__" / "packed")
    shard = out / "part-0000-000000000010.parquet"
    shard.write_bytes(shard.read_bytes()[:50])  # truncated, e.g. by a bad copy
    tokenize_corpus(src, out, chunk_size=10, resume=True, progress_bar=False)
    _same(out, ref)
