"""Targets of a joint (human + mouse, GeneCompass) dictionary resolve in each species' own Ensembl table;
human-only and mouse-only dictionaries, a user's own symbol table and ``--orthologs`` keep one resolution."""

from __future__ import annotations

import pytest

from scfm_fast.vocab.ensembl import ensembl_name_map
from scfm_fast.vocab.targets import TargetResolver

HUMAN, MOUSE = ensembl_name_map("human"), ensembl_name_map("mouse")


def _joint():
    """A small joint dictionary: ACTB/Actb, H19 in both species (same spelling), TP53 human-only, Gsta3
    mouse-only, a handful of other genes of each species so both count as the dictionary's species."""
    genes = [HUMAN["ACTB"], MOUSE["Actb"], HUMAN["H19"], MOUSE["H19"], HUMAN["TP53"], MOUSE["Gsta3"],
             *(HUMAN[s] for s in ("MYC", "CD24", "B2M")), *(MOUSE[s] for s in ("Myc", "B2m", "Ubb"))]
    return {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}}


def test_joint_dictionary_resolves_symbols_in_each_species():
    tok = _joint()
    r = TargetResolver(tok)
    per = r.by_species()
    assert set(per) == {0, 1} and r.by_species() is per  # built once
    human, mouse = per[0], per[1]
    t = {g: tok[e] for g, e in (("ACTB", HUMAN["ACTB"]), ("Actb", MOUSE["Actb"]), ("TP53", HUMAN["TP53"]),
                                ("Gsta3", MOUSE["Gsta3"]), ("H19h", HUMAN["H19"]), ("H19m", MOUSE["H19"]))}
    # own symbols; the other species' symbols never by case
    assert (human.resolve_one("ACTB"), mouse.resolve_one("Actb")) == (t["ACTB"], t["Actb"])
    assert human.resolve_one("Actb") is None and mouse.resolve_one("ACTB") is None
    assert human.resolve_one("Gsta3") is None and mouse.resolve_one("TP53") is None
    # a spelling of neither table: each species' own gene by case (as the tokenizer matches within a species)
    assert (human.resolve_one("actb"), mouse.resolve_one("actb")) == (t["ACTB"], t["Actb"])
    # one symbol spelled alike in both species names both genes
    assert (human.resolve_one("H19"), mouse.resolve_one("H19")) == (t["H19h"], t["H19m"])
    # Ensembl and token ids name the same token in both (a cell of the other species just lacks it)
    for g in (MOUSE["Actb"], MOUSE["Actb"] + ".3", str(t["Actb"]), t["Actb"]):
        assert human.resolve_one(g) == mouse.resolve_one(g) == t["Actb"]
    # labels: each species' genes by its own table, H19 included for both
    sym = r.symbol_of()
    assert sym[t["H19h"]] == sym[t["H19m"]] == "H19" and sym[t["Actb"]] == "Actb" and sym[t["ACTB"]] == "ACTB"


def test_joint_table_named_explicitly_is_joint_too():
    assert TargetResolver(_joint(), "ensembl-human+mouse").by_species() is not None


@pytest.mark.parametrize("case", ["human", "mouse", "own-table", "orthologs"])
def test_other_datasets_keep_one_resolution(case, tmp_path):
    tok = _joint()
    if case == "human":
        r = TargetResolver({g: t for g, t in tok.items() if not g.startswith("ENSMUSG")})
    elif case == "mouse":
        r = TargetResolver({g: t for g, t in tok.items() if not g.startswith("ENSG")})
    elif case == "own-table":
        r = TargetResolver(tok, {"MyActb": MOUSE["Actb"]})
    else:
        r = TargetResolver(tok, orthologs={"Actb": HUMAN["ACTB"]})
    assert r.by_species() is None
    if case == "mouse":
        assert r.resolve_one("Actb") == tok[MOUSE["Actb"]]
    if case == "own-table":
        assert r.resolve_one("MyActb") == tok[MOUSE["Actb"]]
