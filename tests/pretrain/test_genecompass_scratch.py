"""GeneCompass from scratch: the four knowledge tables (``--knowledge``) and the homolog remap (``--homologs``)
built from GeneCompass's own prior-knowledge files equal what its code stored in the fixture checkpoint;
the TSV / gene-id forms give the same index; several homologs and bad files behave as documented."""

from __future__ import annotations

import gzip
import json
import logging
import pickle

import numpy as np
import pytest
import torch

from scfm_fast._errors import InputFileError, UsageError
from scfm_fast.model.genecompass import KNOWLEDGE
from scfm_fast.pretrain.homologs import homologous_index
from scfm_fast.pretrain.knowledge import knowledge_tables, parse_knowledge
from tests._genecompass import fixture_path

_FILES = {"promoter": "promoter", "co_exp": "coexp", "gene_family": "family", "peca_grn": "peca"}


@pytest.fixture(scope="module")
def fx(shared_dir):
    root = fixture_path(shared_dir)
    kn = root / "knowledge"
    with open(kn / "token_dictionary.pkl", "rb") as f:
        tok = pickle.load(f)  # noqa: S301 - the shared fixture
    sd = torch.load(root / "model" / "pytorch_model.bin", weights_only=True)
    manifest = json.loads((root / "manifest.json").read_text())
    return root, kn, tok, sd, manifest


def _species_spec(kn) -> str:
    parts = [f"{n}_{s}={kn / f'{f}_{s}.pickle'}" for n, f in _FILES.items() for s in ("human", "mouse")]
    return ",".join([*parts, f"id2name={kn / 'id2name.pickle'}"])


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def _genecompass_rule(human2mouse: dict, vocab: int) -> np.ndarray:
    """GeneCompass's loader, as its code reads: invert the pickle, then index[mouse] = human."""
    inv = {v: k for k, v in human2mouse.items()}
    idx = torch.arange(vocab)
    idx[list(inv.keys())] = torch.as_tensor(list(inv.values()))
    return idx.numpy()


def test_fixture_homolog_pickle_gives_the_checkpoint_index(fx):
    _, kn, tok, sd, manifest = fx
    idx = homologous_index(kn / "homologous_hm_token.pickle", tok, vocab_size=len(tok))
    np.testing.assert_array_equal(idx, sd["bert.embeddings.homologous_index"].numpy())
    remapped = {str(i): int(v) for i, v in enumerate(idx) if v != i}
    assert remapped == manifest["homolog_model_map_mouse_to_human"]  # mouse token -> human token


def test_fixture_species_files_give_the_checkpoint_tables(fx):
    _, kn, tok, sd, _ = fx
    files = parse_knowledge(_species_spec(kn))
    tables = knowledge_tables(files, tok, vocab_size=len(tok), needed=KNOWLEDGE)
    for k in KNOWLEDGE:
        np.testing.assert_array_equal(tables[k], sd[f"bert.embeddings.{k}_knowledge"].numpy())


def test_build_from_scratch_with_fixture_files_matches_checkpoint(fx):
    """The whole from-scratch path (config, dictionary, --knowledge, --homologs) -> the checkpoint's buffers."""
    from scfm_fast.pretrain.build import model_config
    from scfm_fast.pretrain.genecompass import build_genecompass
    from scfm_fast.pretrain.presets import PretrainOptions

    root, kn, tok, sd, _ = fx
    opts = PretrainOptions(out="-", config=str(root / "model" / "config.json"),
                           token_dictionary=str(kn / "token_dictionary.pkl"), knowledge=_species_spec(kn),
                           homologs=str(kn / "homologous_hm_token.pickle")).resolved()
    cfg = model_config(opts, vocab_size=len(tok), specials={"<pad>": 0, "<mask>": 1})
    emb = build_genecompass(cfg, opts).bert.embeddings
    for k in (*(f"{k}_knowledge" for k in KNOWLEDGE), "homologous_index"):
        torch.testing.assert_close(getattr(emb, k), sd[f"bert.embeddings.{k}"], rtol=0, atol=0)


def test_tsv_and_gene_id_pickle_equal_the_token_pickle(fx, tmp_path):
    _, kn, tok, _, _ = fx
    with open(kn / "homologous_hm_token.pickle", "rb") as f:
        h2m = pickle.load(f)  # noqa: S301 - the shared fixture
    gene = {t: g for g, t in tok.items()}
    want = homologous_index(kn / "homologous_hm_token.pickle", tok, vocab_size=len(tok))
    rows = [f"{gene[h]}\t{gene[m]}" for h, m in h2m.items()]
    text = "\n".join(["human_id\tmouse_id", "# from the fixture", *rows, "ENSG09999999999\tENSMUSG09999999999", ""])
    (tmp_path / "h.tsv").write_text(text)
    with gzip.open(tmp_path / "h.tsv.gz", "wt") as f:
        f.write(text)
    ids = _dump(tmp_path / "ids.pkl", {gene[h]: gene[m] for h, m in h2m.items()})
    for p in (tmp_path / "h.tsv", tmp_path / "h.tsv.gz", ids):
        np.testing.assert_array_equal(homologous_index(p, tok, vocab_size=len(tok)), want)


def test_several_homologs_follow_genecompass_last_wins(fx, tmp_path, caplog):
    _, _, tok, _, _ = fx
    gene = {t: g for g, t in tok.items()}
    h2m = {5: 62, 2: 63, 40: 62, 17: 64, 9: 64}  # 62 and 64 each have two human homologs
    with caplog.at_level(logging.WARNING, logger="scfm_fast"):
        got = homologous_index(_dump(tmp_path / "h.pkl", h2m), tok, vocab_size=len(tok))
    np.testing.assert_array_equal(got, _genecompass_rule(h2m, len(tok)))
    assert (got[62], got[64]) == (40, 9) and "2 mouse genes have several human homologs" in caplog.text
    (tmp_path / "h.tsv").write_text("".join(f"{gene[h]}\t{gene[m]}\n" for h, m in h2m.items()))
    np.testing.assert_array_equal(homologous_index(tmp_path / "h.tsv", tok, vocab_size=len(tok)), got)


@pytest.mark.parametrize(("obj", "match"), [
    ({5: 62, 2: 500}, r"human token 2 -> mouse token 500: token 500 is outside the token dictionary \(0\.\.101\)"),
    ({62: 5}, r"mouse token 5: that is ENSMUSG\S+ -> ENSG\S+; the pickle must map human token -> mouse token"),
    ({0: 62}, r"human token 0 -> mouse token 62: names <pad>"),
    ({5: "x"}, r"entry 5 -> 'x': a homolog pickle maps human token -> mouse token"),
    ({"HG1": "Mg1"}, r"none of its homolog pairs names a human and a mouse gene of the token dictionary"),
])
def test_bad_homolog_pickles_are_refused_naming_the_entry(fx, tmp_path, obj, match):
    _, _, tok, _, _ = fx
    p = _dump(tmp_path / "bad.pkl", obj)
    with pytest.raises(InputFileError, match=match) as e:
        homologous_index(p, tok, vocab_size=len(tok))
    assert str(p) in str(e.value)


def test_bad_homolog_tsvs_are_refused_naming_the_line(fx, tmp_path):
    _, _, tok, _, _ = fx
    gene = {t: g for g, t in tok.items()}
    bad = tmp_path / "b.tsv"
    bad.write_text(f"{gene[5]}\t{gene[62]}\n{gene[2]}\t{gene[63]}\textra\n")
    with pytest.raises(InputFileError, match=r"b\.tsv, line 2: expected 2 tab-separated columns .* got 3"):
        homologous_index(bad, tok, vocab_size=len(tok))
    bad.write_text(f"# header comment\n{gene[5]}\t{gene[62]}\n{gene[63]}\t{gene[2]}\n")
    with pytest.raises(InputFileError, match=r"b\.tsv, line 3: .*the first column must be the human gene id"):
        homologous_index(bad, tok, vocab_size=len(tok))
    with pytest.raises(InputFileError, match="cannot read the homolog table"):
        homologous_index(tmp_path / "missing.tsv", tok, vocab_size=len(tok))


def test_knowledge_option_refusals(fx, tmp_path):
    _, kn, tok, _, _ = fx
    spec = _species_spec(kn)
    no_map = ",".join(p for p in spec.split(",") if not p.startswith("id2name="))
    with pytest.raises(UsageError, match="need id2name=PKL"):
        knowledge_tables(parse_knowledge(no_map), tok, vocab_size=len(tok), needed=KNOWLEDGE)
    both = f"{spec},promoter={kn / 'promoter_human.pickle'}"
    with pytest.raises(UsageError, match="give promoter either as promoter= or as promoter_human="):
        knowledge_tables(parse_knowledge(both), tok, vocab_size=len(tok), needed=KNOWLEDGE)
    with pytest.raises(UsageError, match="given twice"):
        parse_knowledge(f"{spec},id2name=x")
    with pytest.raises(UsageError, match="NAME_human=/NAME_mouse="):
        parse_knowledge("promoter_rat=x")
    # symbol-keyed files passed as gene-id tables: refused, naming the file and an example key
    by_symbol = ",".join(f"{n}={kn / f'{f}_human.pickle'}" for n, f in _FILES.items())
    with pytest.raises(InputFileError, match=r"promoter_human\.pickle: none of its 60 keys \(e\.g\. 'HG1'\)"):
        knowledge_tables(parse_knowledge(by_symbol), tok, vocab_size=len(tok), needed=KNOWLEDGE)
    narrow = _dump(tmp_path / "narrow.pkl", {g: np.zeros(8, np.float32) for g in tok if g.startswith("ENSG")})
    mixed = ",".join([*(p for p in spec.split(",") if not p.startswith("peca_grn_human")),
                      f"peca_grn_human={narrow}"])
    with pytest.raises(InputFileError):  # keyed by id, not symbol: no match (a width error needs a match)
        knowledge_tables(parse_knowledge(mixed), tok, vocab_size=len(tok), needed=KNOWLEDGE)
    with open(kn / "id2name.pickle", "rb") as f:
        id2name = pickle.load(f)  # noqa: S301 - the shared fixture
    narrow = _dump(tmp_path / "narrow.pkl", {id2name[g]: np.zeros(8, np.float32) for g in tok if g.startswith("ENSG")})
    with pytest.raises(InputFileError, match=r"narrow\.pkl: 'HG1' has a 8-d vector but .* has 768-d ones"):
        knowledge_tables(parse_knowledge(mixed), tok, vocab_size=len(tok), needed=KNOWLEDGE)


def test_missing_genes_get_zero_rows(fx, tmp_path):
    _, kn, tok, sd, _ = fx
    with open(kn / "promoter_mouse.pickle", "rb") as f:
        mouse = pickle.load(f)  # noqa: S301 - the shared fixture
    dropped = next(iter(mouse))
    del mouse[dropped]
    spec = _species_spec(kn).replace(str(kn / "promoter_mouse.pickle"), str(_dump(tmp_path / "pm.pkl", mouse)))
    got = knowledge_tables(parse_knowledge(spec), tok, vocab_size=len(tok), needed=KNOWLEDGE)["promoter"]
    want = sd["bert.embeddings.promoter_knowledge"].numpy()
    zero = np.flatnonzero(~np.any(got, axis=1))
    assert set(zero) >= {0, 1} and len(zero) == 3  # <pad>, <mask> and the gene whose symbol was dropped
    keep = np.setdiff1d(np.arange(len(tok)), zero)
    np.testing.assert_array_equal(got[keep], want[keep])


def test_homologs_and_knowledge_refused_for_geneformer_tokens(tmp_path):
    from scfm_fast.pretrain import pretrain_model
    from tests.pretrain._store import random_cells, write_dictionary, write_store

    d = write_dictionary(tmp_path / "dict.pkl", 40)
    store = write_store(tmp_path / "tokens", random_cells(10, vocab_size=40, lo=4, hi=10), dictionary=d)
    (tmp_path / "h.tsv").write_text("ENSG1\tENSMUSG1\n")
    with pytest.raises(UsageError, match="--homologs only apply to GeneCompass pretraining"):
        pretrain_model([store], out=tmp_path / "run", preset="geneformer-v1-6l", token_dictionary=str(d),
                       homologs=str(tmp_path / "h.tsv"), max_steps=1, progress=False)
