"""Export to GeneCompass's dataset layout: datasets.load_from_disk reads it; padded input_ids and
values equal our packed store; length and species one-element lists."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast._errors import StoreError
from scfm_fast.store import TokenStore
from scfm_fast.store.export import export_genecompass
from scfm_fast.tokenizer.pipeline import tokenize_corpus
from tests._genecompass import human_mouse_inputs, joint_dictionaries

datasets = pytest.importorskip("datasets")
pytest.importorskip("anndata")


@pytest.fixture(scope="module")
def token_dataset(tmp_path_factory, pbmc_path):
    tmp = tmp_path_factory.mktemp("export")
    hp, mp, human_ids, mouse_ids = human_mouse_inputs(tmp, pbmc_path, n_mouse=25)
    tok, med = joint_dictionaries(tmp, human_ids, mouse_ids)
    out = tmp / "tokens"
    tokenize_corpus([hp, mp], out, preset="genecompass", token_dictionary=tok, gene_median=med,
                    species_column="organism", progress_bar=False)
    return tmp, out, tok, med, hp


def test_export_reads_back_equal(token_dataset):
    tmp, out, *_ = token_dataset
    dest = export_genecompass(out, tmp / "gc", batch_size=33)
    ds = datasets.load_from_disk(str(dest))
    store = TokenStore(out)
    assert ds.num_rows == len(store) and set(ds.column_names) == {"input_ids", "values", "length", "species"}
    assert ds.features["input_ids"].length == 2048 and ds.features["values"].feature.dtype == "float32"
    ds = ds.with_format("numpy")
    rows = ds[:]
    ids, vals = rows["input_ids"], rows["values"]
    assert ids.shape == (len(store), 2048)
    schema = ds.data.schema  # the stored types (the numpy formatter widens ints to int64)
    assert str(schema.field("input_ids").type) == "fixed_size_list<item: int32>[2048]"
    assert str(schema.field("values").type) == "fixed_size_list<item: float>[2048]"
    for i in range(len(store)):
        n = int(store.lengths[i])
        assert rows["length"][i].tolist() == [n] and rows["species"][i].tolist() == [int(store.species[i])]
        np.testing.assert_array_equal(ids[i, :n], store[i])
        np.testing.assert_array_equal(vals[i, :n], store.cell_values(i))
        assert not ids[i, n:].any() and not vals[i, n:].any()
    assert set(np.asarray(store.species).tolist()) == {0, 1}
    with pytest.raises(StoreError, match="already exists"):
        export_genecompass(out, tmp / "gc")
    assert not (tmp / "gc.tmp").exists()


def test_export_refuses_rank_datasets_and_long_cells(token_dataset, pbmc_path):
    tmp, out, *_ = token_dataset
    with pytest.raises(StoreError, match="more than max_len=100"):
        export_genecompass(out, tmp / "short", max_len=100)
    assert not (tmp / "short").exists()
    rank = tmp / "rank"
    tokenize_corpus(pbmc_path, rank, progress_bar=False)
    with pytest.raises(StoreError, match="no values"):
        export_genecompass(rank, tmp / "x")
