"""GeneCompass screens by gene symbol on a joint (human + mouse) dataset: bundled human PBMC and mouse dentate
gyrus cells tokenized together with ``--preset genecompass``. A symbol resolves in each cell's own species
(mouse symbol -> its ENSMUSG gene in mouse cells, human symbol -> its ENSG gene in human cells), never across
species by case; results equal the same screen run by explicit Ensembl ids."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from scfm_fast.cli import main
from scfm_fast.model.genecompass_checkpoint import load_genecompass, save_genecompass
from scfm_fast.perturb import perturb_cells
from scfm_fast.store import open_cells
from scfm_fast.vocab.ensembl import ensembl_name_map

from .gc_data import random_model, tokenize_human_mouse

pytest.importorskip("anndata")


@pytest.fixture(scope="module")
def gc(tmp_path_factory, pbmc_path):
    """``(tokens, token dictionary, checkpoint)``: 3 human and 3 mouse cells, a random GeneCompass model."""
    tmp = tmp_path_factory.mktemp("gcsymbols")
    tokens, tok = tokenize_human_mouse(tmp, pbmc_path, n_human=3, n_mouse=3)
    return tokens, tok, save_genecompass(random_model(tok), tmp / "model")


def _names(tok):
    """``(token id -> Ensembl id, Ensembl id -> symbol of its species' bundled table)``."""
    import pickle

    with open(tok, "rb") as f:
        ens_of = {t: g for g, t in pickle.load(f).items()}
    return ens_of, {e: s for sp in ("human", "mouse") for s, e in ensembl_name_map(sp).items()}


def _shared_genes(tokens, tok):
    """Genes expressed in both species' cells whose symbols differ only by case (e.g. Tmsb4x / TMSB4X):
    ``[(mouse symbol, ENSMUSG, human symbol, ENSG), ...]`` — the case a cross-species match would get wrong."""
    ens_of, sym = _names(tok)
    src = open_cells(tokens)
    cells = src.take(range(len(src)))
    by_species: dict[int, dict[str, str]] = {0: {}, 1: {}}
    for ids, sp in zip(cells, src.species):
        for t in ids:
            e = ens_of[int(t)]
            if e in sym:
                by_species[int(sp)][sym[e].upper()] = e
    out = []
    for up in sorted(set(by_species[0]) & set(by_species[1])):
        h, m = by_species[0][up], by_species[1][up]
        if h.startswith("ENSG") and m.startswith("ENSMUSG") and sym[h] != sym[m]:
            out.append((sym[m], m, sym[h], h))
    assert len(out) >= 2, out
    return out


def _run(tokens, tok, ckpt, out, genes, *extra):
    args = ["perturb", str(tokens), "--model", str(ckpt), "--out", str(out), "--genes", genes, "--special-tokens",
            "0,1", "--token-dictionary", str(tok), "--cells-per-shard", "2", "--no-stats", *extra]
    return main(args)


@pytest.mark.parametrize("perturbation", ["delete", "overexpress"])
def test_cli_symbols_resolve_per_species_and_equal_explicit_ids(gc, tmp_path, perturbation):
    tokens, tok, ckpt = gc
    (m_sym, m_id, _, _), (_, _, h_sym, h_id) = _shared_genes(tokens, tok)[:2]
    assert _run(tokens, tok, ckpt, tmp_path / "sym", f"{m_sym},{h_sym}", "--perturb", perturbation) == 0
    assert _run(tokens, tok, ckpt, tmp_path / "ids", f"{m_id},{h_id}", "--perturb", perturbation) == 0
    a = pd.read_parquet(tmp_path / "sym" / "perturbations.parquet")
    b = pd.read_parquet(tmp_path / "ids" / "perturbations.parquet")
    pd.testing.assert_frame_equal(a, b)  # identical numbers, tokens, ids and names
    src = open_cells(tokens)
    species = {(int(f), int(c)): int(s) for f, c, s in zip(src.file_index, src.cell_index, src.species)}
    row_species = np.array([species[(f, c)] for f, c in zip(a["file_index"], a["cell_index"])])
    assert set(row_species.tolist()) == {0, 1}
    # each row says which gene id it perturbed: the mouse gene in mouse cells, the human gene in human cells
    assert (a.loc[row_species == 1, "ensembl_id"] == m_id).all() and (a.loc[row_species == 1, "gene_name"] == m_sym).all()
    assert (a.loc[row_species == 0, "ensembl_id"] == h_id).all() and (a.loc[row_species == 0, "gene_name"] == h_sym).all()
    # the other species' symbol is skipped and counted in each cell, never matched by case
    skips = [r for p in sorted((tmp_path / "sym" / "shards").glob("part-*.json"))
             for r in json.loads(p.read_text())["skipped"]]
    n_cells = {s: int((src.species == s).sum()) for s in (0, 1)}
    assert sum(f"{m_sym} names no human gene" in r["reason"] for r in skips) == n_cells[0]
    assert sum(f"{h_sym} names no mouse gene" in r["reason"] for r in skips) == n_cells[1]
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("sym", "ids")]
    assert manifests[0]["summary"]["n_skipped"] == manifests[1]["summary"]["n_skipped"] >= sum(n_cells.values())


def test_cli_symbol_unknown_in_both_species_is_an_error_naming_it(gc, tmp_path, capsys):
    tokens, tok, ckpt = gc
    m_sym = _shared_genes(tokens, tok)[0][0]
    assert _run(tokens, tok, ckpt, tmp_path / "out", f"{m_sym},NotAGeneQq7") == 2
    err = capsys.readouterr().err
    assert "NotAGeneQq7" in err and "human or mouse" in err and m_sym not in err
    assert not (tmp_path / "out" / "perturbations.parquet").exists()


def _cell_genes(tokens, tok, row):
    """``[(symbol, Ensembl id), ...]`` of the genes of cell ``row`` that carry a symbol of their species' table."""
    ens_of, sym = _names(tok)
    ids = [ens_of[int(t)] for t in open_cells(tokens).take([row])[0]]
    return [(sym[e], e) for e in ids if e in sym]


def test_anchor_and_combine_per_species(gc):
    tokens, tok, ckpt = gc
    model = load_genecompass(ckpt)
    m_sym, m_id, h_sym, h_id = _shared_genes(tokens, tok)[0]
    kw = dict(special_token_ids=[0, 1], token_dictionary=tok, progress_bar=False)
    species = open_cells(tokens).species
    # a symbol spelled as neither species' (e.g. "tmsb4x"): each species' own gene by case, pairs per species
    both = perturb_cells(tokens, model, genes="all", anchor=m_sym.lower(), **kw)
    first = both["gene_tokens"].map(lambda t: int(t[0]))
    n = 0
    for anchor_id in (h_id, m_id):
        want = perturb_cells(tokens, model, genes="all", anchor=anchor_id, **kw)  # the other species: skipped
        a_tok = int(want["gene_tokens"].iloc[0][0])
        pd.testing.assert_frame_equal(both[first == a_tok].reset_index(drop=True), want)
        assert len(want) > 0 and (want["gene_token"] != a_tok).all()  # gene_token: the partner, not the anchor
        n += len(want)
    assert n == len(both)
    # a mouse-only anchor: human cells have no pairs, each recorded
    mouse = perturb_cells(tokens, model, genes="all", anchor=m_sym, **kw)
    assert len(mouse) > 0 and mouse["ensembl_id"].str.startswith(m_id + "+ENSMUSG").all()
    assert sum("anchor gene" in r["reason"] and "no human gene" in r["reason"]
               for r in mouse.attrs["skipped"]) == int((species == 0).sum()) > 0
    # --combine: the whole list together, in the species whose genes it names
    (s1, e1), (s2, e2) = _cell_genes(tokens, tok, len(species) - 1)[3:5]
    a = perturb_cells(tokens, model, genes=[s1, s2], combine=True, **kw)
    b = perturb_cells(tokens, model, genes=[e1, e2], combine=True, **kw)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) > 0 and a["ensembl_id"].str.startswith("ENSMUSG").all()
    mixed = perturb_cells(tokens, model, genes=[s1, h_sym], combine=True, **kw)
    assert len(mixed) == 0 and len(mixed.attrs["skipped"]) == len(species)
