"""Screen targets resolve exactly as the tokenizer resolves the cells' genes (one rule set)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scfm_fast._errors import GeneMatchError, UsageError
from scfm_fast.vocab import GeneVocab, load_gene_name_map, load_ortholog_map, resolve_genes
from scfm_fast.vocab.targets import TargetResolver

# mouse Gsta3's one-to-one human ortholog is GSTA5; by case it would wrongly be human GSTA3
CD24, GSTA5, GSTA3 = "ENSG00000272398", "ENSG00000182793", "ENSG00000174156"


@pytest.fixture(scope="module")
def vocab():
    return GeneVocab.load()


def _ids(names):
    tp53 = names["TP53"]
    return [tp53, tp53 + ".4", "TP53", "tp53", "Tp53", "Actb", "Gsta3", "Cd24a", "ENSMUSG00000025934",
            "ENSMUSG00000025934.2", GSTA3, "RP11-34P13.3", "NOT_A_GENE", CD24 + ".x"]


@pytest.mark.parametrize("orthologs", [None, "mouse-to-human"])
def test_targets_agree_with_the_tokenizer_gene_by_gene(vocab, orthologs):
    names = load_gene_name_map()
    orth = load_ortholog_map(orthologs) if orthologs else None
    ids = _ids(names)
    col, _ = resolve_genes(ids, vocab, gene_name_map=names, ortholog_map=orth, min_fraction=0.0)
    r = TargetResolver(orthologs=orthologs)
    got = [r.resolve_one(g) for g in ids]
    assert got == [None if t < 0 else int(t) for t in col]
    # and the cases that matter, spelled out
    assert got[0] == got[1] == got[2] == vocab.token_of[names["TP53"]]
    assert got[-2] is None and got[-1] is None  # "CD24.x" is no Ensembl version suffix
    if orthologs:
        assert got[6] == vocab.token_of[GSTA5] and got[8] == got[9] and got[8] is not None
        assert got[3] is None  # with orthologs, never by case to a human symbol
    else:
        assert got[3] == got[0]
        assert got[6] == vocab.token_of[GSTA3]  # one species: symbols match case-insensitively, as tokenize


def test_median_rule_is_the_tokenizers(tmp_path):
    # a gene with a token but no median is never tokenized, so it is no target either
    tokens = {"<pad>": 0, "<mask>": 1, CD24: 2, GSTA5: 3, GSTA3: 4}
    medians = {CD24: 1.0, GSTA5: 2.0}
    vocab = GeneVocab(tokens, medians)
    col, _ = resolve_genes([CD24, GSTA5, GSTA3], vocab, min_fraction=0.0)
    r = TargetResolver(tokens, gene_median=medians)
    assert [r.resolve_one(g) for g in (CD24, GSTA5, GSTA3)] == [2, 3, None] == [2, 3, None if col[2] < 0 else 4]
    assert r.resolve_one(4) is None and r.resolve_one("3") == 3  # ids too: only tokenized genes
    assert TargetResolver(tokens).resolve_one(GSTA3) == 4  # medians unknown: every dictionary gene counts


def test_special_tokens_and_ids_are_refused_or_unresolved():
    r = TargetResolver()
    assert r.special_token_ids() == [0, 1]
    for special in ("<pad>", "<mask>", 0, "1"):
        with pytest.raises(UsageError, match="special token"):
            r.resolve_one(special)
    assert r.resolve_one(25_426) is None and r.resolve_one(-3) is None  # outside the vocabulary
    assert r.ensembl_of()[2].startswith("ENSG")


def test_groups_keep_the_users_order(vocab):
    names = load_gene_name_map()
    r = TargetResolver()
    a, b, c = (r.resolve_one(g) for g in ("TP53", "MYC", "CD24"))
    assert r.resolve("all") == (None, [])
    groups, unknown = r.resolve(["MYC", ("TP53", "CD24"), "NOT_A_GENE"])
    assert groups == [(b,), (a, c)] and unknown == ["NOT_A_GENE"]
    assert r.resolve(["CD24", "TP53", "CD24", "MYC"], combine=True)[0] == [(c, a, b)]
    assert r.resolve("TP53") == ([(a,)], [])
    assert r.resolve([names["TP53"] + ".9"])[0] == [(a,)]
    with pytest.raises(GeneMatchError, match="NOT_A_GENE"):
        r.resolve(["TP53", "NOT_A_GENE"], strict=True)
    with pytest.raises(GeneMatchError, match="none of the requested"):
        r.resolve(["NOT_A_GENE"])


def test_for_cells_uses_the_datasets_orthologs_and_dictionary(tmp_path):
    import pickle

    import pyarrow as pa
    import pyarrow.parquet as pq

    from scfm_fast.vocab.dictionaries import file_sha256

    own = {"<pad>": 0, "<mask>": 1, CD24: 5, GSTA5: 6, GSTA3: 7}
    (tmp_path / "tok.pkl").write_bytes(pickle.dumps(own))
    d = tmp_path / "tokens"
    (d / "__scfm__").mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": pa.array([[5, 6, 7]], pa.list_(pa.int32()))}),
                   d / "part-0000-000000000000.parquet")
    (d / "__scfm__/manifest.json").write_text(json.dumps({"status": "complete", "config": {
        "orthologs": "mouse-to-human", "dictionary_hashes": {"token_dictionary": file_sha256(tmp_path / "tok.pkl")}}}))
    r = TargetResolver.for_cells(str(d), token_dictionary=tmp_path / "tok.pkl")
    assert [r.resolve_one(g) for g in ("Cd24a", "Gsta3", "ENSMUSG00000025934", GSTA3)] == [5, 6, 6, 7]
    with pytest.raises(UsageError, match="another token dictionary"):
        TargetResolver.for_cells(str(d))  # the bundled V1 dictionary's ids would name other genes
    assert isinstance(np.int64(5), np.integer) and r.resolve_one(np.int64(5)) == 5


# ---- the symbol table: the one the cells' tokenizer used (mouse-Geneformer: mouse space, no orthologs) ----
def _mouse_tokens():
    from scfm_fast.vocab.ensembl import ensembl_name_map

    mouse = ensembl_name_map("mouse")
    genes = [mouse[s] for s in ("Actb", "Gapdh", "Gsta3", "Cd24a")]
    return mouse, {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}}


def test_mouse_dictionary_resolves_mouse_symbols_in_mouse_space(vocab):
    mouse, tokens = _mouse_tokens()
    r = TargetResolver(tokens)  # no symbol table given: the dictionary's ENSMUSG ids pick the mouse one
    names = ["Actb", "ACTB", "Gsta3", "Cd24a", mouse["Gapdh"], mouse["Gapdh"] + ".3", "GSTA5", "NOT_A_GENE"]
    got = [r.resolve_one(g) for g in names]
    # the tokenizer's own rules over the same table give the same ids, gene by gene
    col, _ = resolve_genes(names, GeneVocab(tokens, dict.fromkeys(tokens, 1.0)),
                           gene_name_map=load_gene_name_map("ensembl-mouse"), min_fraction=0.0)
    assert got == [None if t < 0 else int(t) for t in col]
    assert got[:6] == [2, 2, 4, 5, 3, 3] and got[6:] == [None, None]  # Gsta3 is mouse Gsta3, not human GSTA5
    assert r.symbol_of()[2] == "Actb"
    # the V1 human table would have sent "Actb" by case to human ACTB, which this dictionary lacks
    assert TargetResolver(tokens, "ensembl-human").resolve_one("Actb") is None


def test_symbol_table_choice():
    from scfm_fast.vocab.symbols import default_name_map, dictionary_species, recorded_name_map

    mouse, tokens = _mouse_tokens()
    human = {"<pad>": 0, CD24: 1, GSTA5: 2}
    assert dictionary_species(tokens) == ("mouse",) and default_name_map(tokens) == "ensembl-mouse"
    assert default_name_map({**tokens, **human}) == "ensembl-human+mouse"
    assert default_name_map(human).name == "gene_name_id_dict.pkl" and dictionary_species({"<pad>": 0}) == ()
    assert recorded_name_map({"preset": "mouse-geneformer", "gene_name_map": "auto"}) == "ensembl-mouse"
    assert recorded_name_map({"preset": "genecompass", "gene_name_map": "auto"}) == "ensembl-human+mouse"
    assert recorded_name_map({"preset": "geneformer-v1", "gene_name_map": "auto"}).name == "gene_name_id_dict.pkl"
    assert recorded_name_map({"preset": "geneformer-v1", "gene_name_map": "ensembl-mouse"}) == "ensembl-mouse"
    for unknown in ({}, {"gene_name_map": "None"}, {"gene_name_map": "auto (off: ...)"}, {"gene_name_map": "auto"}):
        assert recorded_name_map(unknown) is None


def test_recorded_table_that_is_gone_warns(tmp_path, caplog):
    from scfm_fast.vocab.symbols import recorded_name_map

    assert recorded_name_map({"gene_name_map": str(tmp_path / "gone.pkl")}) is None
    assert "no longer exists" in caplog.text


def test_for_cells_uses_the_presets_symbol_table(tmp_path):
    import pickle

    import pyarrow as pa
    import pyarrow.parquet as pq

    from scfm_fast.vocab.dictionaries import file_sha256

    mouse, tokens = _mouse_tokens()
    (tmp_path / "tok.pkl").write_bytes(pickle.dumps(tokens))
    d = tmp_path / "tokens"
    (d / "__scfm__").mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": pa.array([[2, 3]], pa.list_(pa.int32()))}), d / "part-0000-000000000000.parquet")
    config = {"preset": "mouse-geneformer", "gene_name_map": "auto", "orthologs": "None",
              "dictionary_hashes": {"token_dictionary": file_sha256(tmp_path / "tok.pkl")}}
    (d / "__scfm__/manifest.json").write_text(json.dumps({"status": "complete", "config": config}))
    r = TargetResolver.for_cells(str(d), token_dictionary=tmp_path / "tok.pkl")
    assert r._name_src == "ensembl-mouse"
    assert [r.resolve_one(g) for g in ("Actb", "Gapdh", "Gsta3")] == [2, 3, 4]
    # an explicit table wins over the record
    assert TargetResolver.for_cells(str(d), token_dictionary=tmp_path / "tok.pkl",
                                    gene_name_map={"Foo": mouse["Actb"]}).resolve_one("Foo") == 2
