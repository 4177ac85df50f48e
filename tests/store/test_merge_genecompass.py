"""``--shard K/N`` outputs of a GeneCompass run (values, species, QC, keep_counts) merged equal a single
run: the packed ``values.npy`` / ``species.npy`` travel with the tokens, QC reports by file index."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast._errors import StoreError
from scfm_fast.store import TokenStore, read_manifest, read_table
from scfm_fast.store.merge import merge_token_datasets
from scfm_fast.tokenizer.pipeline import tokenize_corpus
from tests._genecompass import human_mouse_inputs, joint_dictionaries

anndata = pytest.importorskip("anndata")


@pytest.fixture(scope="module")
def gc_inputs(tmp_path_factory, pbmc_path):
    tmp = tmp_path_factory.mktemp("gcmerge")
    hp, mp, human_ids, mouse_ids = human_mouse_inputs(tmp, pbmc_path)
    m2 = tmp / "mouse2.h5ad"
    a = anndata.read_h5ad(mp)[::-1].copy()  # another mouse file: the same genes, cells reversed
    a.obs_names = [f"r{i}" for i in range(a.n_obs)]
    a.write_h5ad(m2)
    tok, med = joint_dictionaries(tmp, human_ids, mouse_ids)
    return tmp, [hp, mp, m2], tok, med


def _run(paths, out, tok, med, **kw):
    return tokenize_corpus(paths, out, preset="genecompass", token_dictionary=tok, gene_median=med,
                           species_column="organism", qc="genecompass", keep_counts=True, chunk_size=50,
                           progress_bar=False, **kw)


def test_genecompass_shards_merge_with_values_species_and_qc(gc_inputs):
    tmp, paths, tok, med = gc_inputs
    single = _run(paths, tmp / "single", tok, med)
    assert single["packed"]["optional"] == ["values", "species"]
    assert single["summary"]["n_qc_dropped"] > 0  # the PBMC file has QC outliers
    parts = [tmp / "s1", tmp / "s2"]
    for k, p in enumerate(parts, 1):
        _run(paths, p, tok, med, shard=f"{k}/2")
    merged = merge_token_datasets(parts[::-1], tmp / "merged")
    assert merged["config"] == single["config"] and merged["config_hash"] == single["config_hash"]
    for key in ("n_cells", "n_tokens", "inputs", "gene_match", "shards", "packed", "qc"):
        assert merged[key] == single[key], key
    for key in ("n_cells_in", "n_empty", "n_qc_dropped", "counts_total", "counts_matched"):
        assert merged["summary"][key] == single["summary"][key], key
    got, want = read_table(tmp / "merged"), read_table(tmp / "single")
    assert {"values", "species", "counts"} <= set(want.column_names)
    assert got.equals(want)
    a, b = TokenStore(tmp / "merged"), TokenStore(tmp / "single")
    for name in ("tokens", "offsets", "cell_index", "file_index", "values", "species"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert set(np.unique(a.species).tolist()) == {0, 1}
    assert read_manifest(tmp / "merged")["packed"]["optional"] == ["values", "species"]


def test_merge_refuses_a_part_without_its_optional_arrays(gc_inputs):
    tmp, paths, tok, med = gc_inputs
    parts = [tmp / "t1", tmp / "t2"]
    for k, p in enumerate(parts, 1):
        _run(paths, p, tok, med, shard=f"{k}/2")
    segment = sorted((parts[1] / "__scfm__" / "packed" / "values").iterdir())[0]
    segment.unlink()  # one shard's values segment
    with pytest.raises(StoreError, match=rf"values/{segment.name}: missing"):
        merge_token_datasets(parts, tmp / "m")
    assert not (tmp / "m").exists()
    (parts[0] / "__scfm__" / "packed" / "species.npy").unlink()  # a per-cell array
    with pytest.raises(StoreError, match="species.npy: missing"):
        merge_token_datasets(parts, tmp / "m")
    assert not (tmp / "m").exists()


def test_cli_genecompass_shards_with_keep_counts_and_merge(gc_inputs):
    from scfm_fast.cli import main

    tmp, paths, tok, med = gc_inputs
    common = [*map(str, paths), "--preset", "genecompass", "--token-dictionary", str(tok), "--gene-median", str(med),
              "--species-column", "organism", "--qc", "genecompass", "--keep-counts", "--chunk-size", "50"]
    for k in (1, 2):
        assert main(["tokenize", *common, "--out", str(tmp / f"c{k}"), "--shard", f"{k}/2"]) == 0
    assert main(["tokenize", str(tmp / "c1"), str(tmp / "c2"), "--merge", str(tmp / "cm")]) == 0
    assert main(["tokenize", *common, "--out", str(tmp / "cone")]) == 0
    got, want = read_table(tmp / "cm"), read_table(tmp / "cone")
    assert {"values", "species", "counts"} <= set(want.column_names) and got.equals(want)
    man = read_manifest(tmp / "cone")
    assert man["config"]["keep_counts"] and man["config"]["values"] and man["config"]["qc"] == "genecompass"
