"""``--shard K/N`` runs joined by the merge equal a single run over all inputs, cell for cell."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from scfm_fast._errors import StoreError, UsageError
from scfm_fast.store import TokenStore, read_manifest, read_table
from scfm_fast.store.merge import merge_token_datasets
from scfm_fast.store.schema import MANIFEST, PACKED_DIR
from scfm_fast.tokenizer.pipeline import tokenize_corpus
from scfm_fast.vocab import GeneVocab
from tests._data import make_counts_adata

pytest.importorskip("anndata")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    vocab = GeneVocab.load()
    paths = []
    for i, (n, fmt) in enumerate([(23, "h5ad"), (9, "zarr"), (31, "h5ad"), (14, "h5ad")]):
        a = make_counts_adata(vocab, n_cells=n, n_genes=50, seed=i)
        p = d / f"f{i}.{fmt}"
        a.write_h5ad(p) if fmt == "h5ad" else a.write_zarr(p)
        paths.append(p)
    return paths


def _run(paths, out, **kw):
    return tokenize_corpus(paths, out, chunk_size=8, obs_columns=["batch"], progress_bar=False, **kw)


def test_merged_shards_equal_a_single_run(tmp_path, inputs):
    single = _run(inputs, tmp_path / "single")
    parts = [tmp_path / f"s{k}" for k in (1, 2, 3)]
    for k, p in enumerate(parts, 1):
        man = _run(inputs, p, shard=f"{k}/3")
        assert man["config"]["shard"]["files"] == list(range(k - 1, len(inputs), 3))
    merged = merge_token_datasets(parts[::-1], tmp_path / "merged")
    assert merged["config"] == single["config"] and merged["config_hash"] == single["config_hash"]
    for key in ("n_cells", "n_tokens", "inputs", "gene_match", "shards", "packed"):
        assert merged[key] == single[key], key
    for key in ("n_cells_in", "n_empty", "counts_total", "counts_matched"):
        assert merged["summary"][key] == single["summary"][key]
    assert read_table(tmp_path / "merged").equals(read_table(tmp_path / "single"))
    a, b = TokenStore(tmp_path / "merged"), TokenStore(tmp_path / "single")
    for name in ("tokens", "offsets", "cell_index", "file_index"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    # Parquet shards are linked, not rewritten
    rec = merged["shards"][0]["file"]
    src = next(p / rec for p in parts if (p / rec).exists())
    assert os.stat(src).st_ino == os.stat(tmp_path / "merged" / rec).st_ino
    # so are the packed store's token segments
    seg = Path("__scfm__/packed/tokens") / rec.replace(".parquet", ".npy")
    src = next(p / seg for p in parts if (p / seg).exists())
    assert os.stat(src).st_ino == os.stat(tmp_path / "merged" / seg).st_ino
    assert read_manifest(tmp_path / "merged")["status"] == "complete"


def _as_single_file_store(d):
    """Rewrite a finished dataset's packed store in the format /1 layout: one tokens.npy."""
    man = json.loads((d / MANIFEST).read_text())
    flat = np.asarray(TokenStore(d).tokens)
    shutil.rmtree(d / PACKED_DIR / "tokens")
    np.save(d / PACKED_DIR / "tokens.npy", flat)
    del man["packed"]["layout"]
    man["format"] = "scfm_fast.tokens/1"
    (d / MANIFEST).write_text(json.dumps(man))


def test_single_file_stores_are_read_and_merged(tmp_path, inputs):
    single = _run(inputs, tmp_path / "single")
    parts = [tmp_path / f"s{k}" for k in (1, 2)]
    for k, p in enumerate(parts, 1):
        _run(inputs, p, shard=f"{k}/2")
    _as_single_file_store(parts[0])  # a format /1 output (an earlier build) merged with a /2 one
    ref = TokenStore(tmp_path / "single")
    old = TokenStore(parts[0])
    assert isinstance(old.tokens, np.ndarray) and len(old) > 0
    merged = merge_token_datasets(parts, tmp_path / "merged")
    assert merged["packed"] == single["packed"] and merged["n_tokens"] == single["n_tokens"]
    a = TokenStore(tmp_path / "merged")
    for name in ("tokens", "offsets", "cell_index", "file_index"):
        np.testing.assert_array_equal(getattr(a, name), getattr(ref, name))
    assert [a[i].tolist() for i in range(len(a))] == [ref[i].tolist() for i in range(len(ref))]


def test_merge_refuses_other_options_missing_and_plain_runs(tmp_path, inputs):
    _run(inputs, tmp_path / "a", shard="1/2")
    _run(inputs, tmp_path / "b", shard="2/2", max_len=64)
    with pytest.raises(UsageError, match="max_len"):
        merge_token_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    with pytest.raises(UsageError, match="2/2 missing"):
        merge_token_datasets([tmp_path / "a"], tmp_path / "m")
    with pytest.raises(UsageError, match="given twice"):
        merge_token_datasets([tmp_path / "a", tmp_path / "a"], tmp_path / "m")
    _run(inputs[:1], tmp_path / "plain")
    with pytest.raises(UsageError, match="not the output of"):
        merge_token_datasets([tmp_path / "plain"], tmp_path / "m")
    assert not (tmp_path / "m").exists()
    _run(inputs, tmp_path / "c", shard="2/2")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        merge_token_datasets([tmp_path / "a", tmp_path / "c"], tmp_path / "m")


def test_shard_option_is_checked(tmp_path, inputs):
    for bad in ("0/2", "3/2", "x", "1/"):
        with pytest.raises(UsageError, match="--shard"):
            _run(inputs, tmp_path / "o", shard=bad)
    with pytest.raises(UsageError, match="takes no file"):
        _run(inputs[:2], tmp_path / "o", shard="3/3")


def test_cli_shard_and_merge(tmp_path, inputs):
    from scfm_fast.cli import main

    args = [str(p) for p in inputs]
    for k in (1, 2):
        assert main(["tokenize", *args, "--out", str(tmp_path / f"s{k}"), "--shard", f"{k}/2"]) == 0
    assert main(["tokenize", str(tmp_path / "s1"), str(tmp_path / "s2"), "--merge", str(tmp_path / "m")]) == 0
    assert main(["tokenize", *args, "--out", str(tmp_path / "one")]) == 0
    assert read_table(tmp_path / "m").equals(read_table(tmp_path / "one"))
    assert main(["tokenize", str(tmp_path / "s1"), "--merge", str(tmp_path / "m2"), "--out", "x"]) == 2
