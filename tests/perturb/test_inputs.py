"""Gene targets of a screen resolve as the tokenizer resolved the cells' genes (orthologs, specials)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from scfm_fast.perturb import perturb_cells
from scfm_fast.vocab.targets import TargetResolver

from .conftest import make_cells, tiny_model

# mouse Gsta3's one-to-one human ortholog is GSTA5; by case it would wrongly be human GSTA3
CD24, GSTA5, GSTA3 = "ENSG00000272398", "ENSG00000182793", "ENSG00000174156"
TOKENS = {"<pad>": 0, "<mask>": 1, CD24: 5, GSTA5: 6, GSTA3: 7}


def test_mouse_symbols_and_ids_resolve_through_orthologs():
    r = TargetResolver(TOKENS, orthologs="mouse-to-human")
    assert [r.resolve_one(g) for g in ("Cd24a", "Gsta3", "ENSMUSG00000025934", GSTA3)] == [5, 6, 6, 7]
    assert TargetResolver(TOKENS).resolve_one("Gsta3") == 7  # human data: case-insensitive symbols stay


def test_screen_of_mouse_tokens_uses_the_datasets_orthologs(tmp_path):
    # cells tokenized with --orthologs mouse-to-human: "Gsta3" must be the token the tokenizer gave it
    cell = make_cells([8], seed=2)[0]
    cell[:3] = [5, 6, 7]
    pq.write_table(pa.table({"input_ids": pa.array([cell.tolist()], pa.list_(pa.int32()))}),
                   tmp_path / "part-0000-000000000000.parquet")
    (tmp_path / "__scfm__").mkdir()
    (tmp_path / "__scfm__" / "manifest.json").write_text(json.dumps(
        {"status": "complete", "config": {"orthologs": "mouse-to-human", "special_tokens": {"<pad>": 0}}}))
    df = perturb_cells(str(tmp_path), tiny_model(), genes=["Cd24a", "Gsta3"], token_dictionary=TOKENS)
    assert df["gene_token"].tolist() == [5, 6]
    assert df["ensembl_id"].tolist() == [CD24, GSTA5]


def test_screen_refuses_another_dictionary_than_the_datasets(tmp_path):
    # tokens made with a custom dictionary (e.g. `scfm medians`): the bundled V1 ids would name other genes
    import pickle

    import pytest

    from scfm_fast._errors import UsageError
    from scfm_fast.vocab.dictionaries import file_sha256

    own = tmp_path / "token_dictionary.pkl"
    own.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, "Aamp": 5}))
    tokens = tmp_path / "tokens"
    (tokens / "__scfm__").mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": pa.array([make_cells([6], seed=4)[0].tolist() + [5]],
                                                   pa.list_(pa.int32()))}),
                   tokens / "part-0000-000000000000.parquet")
    (tokens / "__scfm__" / "manifest.json").write_text(json.dumps(
        {"status": "complete", "config": {"dictionary_hashes": {"token_dictionary": file_sha256(own)}}}))
    with pytest.raises(UsageError, match="another token dictionary"):
        perturb_cells(str(tokens), tiny_model(), genes=["Aamp"])
    df = perturb_cells(str(tokens), tiny_model(), genes=["Aamp"], token_dictionary=str(own))
    assert df["gene_token"].tolist() == [5]


def test_tables_from_tokenize_anndata_carry_their_specials_and_dictionary(tmp_path):
    # a V2-style table from the in-memory API: <cls>/<eos> are known to embed and perturb without being
    # passed, and perturbing it with another dictionary than the one that made it is refused
    import pickle

    import numpy as np
    import pytest

    from scfm_fast import embed_tokens, tokenize_anndata
    from scfm_fast.model.bert import BertEncoderModel
    from scfm_fast.model.config import EncoderConfig
    from scfm_fast.vocab import GeneVocab
    from tests._data import make_counts_adata

    pytest.importorskip("anndata")
    vocab = GeneVocab.load()
    tok = dict(vocab.token_of)
    tok["<cls>"], tok["<eos>"] = vocab.size, vocab.size + 1
    (tmp_path / "tok.pkl").write_bytes(pickle.dumps(tok))
    table = tokenize_anndata(make_counts_adata(vocab, n_cells=6), preset="geneformer-v2", max_len=12,
                             token_dictionary=tmp_path / "tok.pkl", gene_median=vocab.gene_median_path)
    model = BertEncoderModel(EncoderConfig(vocab_size=vocab.size + 2, hidden_size=16, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=24,
                                           max_position_embeddings=16)).eval()
    df = perturb_cells(table, model, token_dictionary=tmp_path / "tok.pkl", pooling="cls", progress_bar=False)
    assert not set(df["gene_token"]) & {vocab.size, vocab.size + 1}  # specials are never perturbed
    assert len(df) == sum(len(c) - 2 for c in table.column("input_ids").to_pylist())
    with pytest.raises(ValueError, match="the token table: tokenized with another token dictionary"):
        perturb_cells(table, model, progress_bar=False)
    emb, _ = embed_tokens(table, model, pooling="cls", progress_bar=False)
    assert np.isfinite(emb).all()


def test_a_saved_token_table_keeps_its_config(tmp_path):
    from scfm_fast.store.cells import open_cells
    from scfm_fast.store.schema import with_table_config

    t = with_table_config(pa.table({"input_ids": pa.array([[5, 6]], pa.list_(pa.int32()))}),
                          {"special_tokens": {"<pad>": 0, "<cls>": 9}, "orthologs": "mouse-to-human"})
    pq.write_table(t, tmp_path / "cells.parquet")
    src = open_cells(tmp_path / "cells.parquet")
    assert src.orthologs == "mouse-to-human"
    assert src.special_token_ids == (0, 9)


def test_unfinished_token_dataset_is_refused_by_the_api(tmp_path):
    import pytest

    from scfm_fast._errors import StoreError
    from scfm_fast.store.schema import MANIFEST

    pq.write_table(pa.table({"input_ids": pa.array([[5, 6]], pa.list_(pa.int32()))}), tmp_path / "p.parquet")
    (tmp_path / MANIFEST).parent.mkdir(parents=True)
    (tmp_path / MANIFEST).write_text(json.dumps({"status": "running"}))
    with pytest.raises(StoreError, match="unfinished"):
        perturb_cells(str(tmp_path), tiny_model(), progress_bar=False)
