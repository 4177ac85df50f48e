"""Which symbol table names a dataset's genes: the one its tokenizer used, so targets resolve alike.

A token dataset's manifest records the tokenizer's ``preset`` and ``gene_name_map``; ``"auto"`` means
the preset's own table (``ensembl-mouse`` for mouse-Geneformer, ``ensembl-human+mouse`` for
GeneCompass) or Geneformer V1's.  Without a record, the token dictionary's own Ensembl ids tell the
species: a dictionary of ENSMUSG ids is named by the mouse table, never by V1's human one (mouse
"Actb" would otherwise match human ACTB by case, a gene such a dictionary does not hold).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .dictionaries import PRESETS, SPECIAL_TOKENS, bundled_dir
from .ensembl import BUNDLED_NAME_MAPS

log = logging.getLogger("scfm_fast")

#: Geneformer V1's symbol table (the default of ``load_gene_name_map``)
V1_NAME_MAP = "gene_name_id_dict.pkl"


def dictionary_species(genes: Iterable[str]) -> tuple[str, ...]:
    """Species whose Ensembl ids make up a token dictionary: ``("human",)``, ``("mouse",)``, both or ``()``.

    A species counts when at least 10% of the Ensembl ids are its own (a few stray ids of the other
    species, e.g. a hand-made dictionary, do not make a joint one).
    """
    n_human = n_mouse = 0
    for g in genes:
        if g in SPECIAL_TOKENS:
            continue
        if g.startswith("ENSMUSG"):
            n_mouse += 1
        elif g.startswith("ENSG"):
            n_human += 1
    total = n_human + n_mouse
    if total == 0:
        return ()
    return tuple(s for s, n in (("human", n_human), ("mouse", n_mouse)) if n >= 0.1 * total)


def default_name_map(token_of: Mapping[str, int]) -> str | Path:
    """The symbol table for a token dictionary with no tokenizer record: by the species of its ids."""
    species = dictionary_species(token_of)
    if species == ("mouse",):
        return "ensembl-mouse"
    if species == ("human", "mouse"):
        return "ensembl-human+mouse"
    return bundled_dir("geneformer_v1") / V1_NAME_MAP  # human (V1, V2) or unknown ids: V1's table, as before


def recorded_name_map(config: Mapping[str, Any]) -> str | Path | None:
    """The symbol table a token dataset's tokenizer config records, or ``None`` when it names none usable.

    ``None`` covers: no record (older datasets, plain lists), no table (``--gene-name-map none`` or a
    ``--gene-mapping-file``), ``auto`` switched off for a non-V1 dictionary, and a recorded file that
    no longer exists (warned: targets then resolve by the dictionary's species instead).
    """
    rec = config.get("gene_name_map")
    if rec is None or rec == "None" or str(rec).startswith("auto (off"):
        return None
    rec = str(rec)
    if rec == "auto":
        pre = PRESETS.get(str(config.get("preset")))
        if pre is None:
            return None
        return pre.gene_name_map or bundled_dir("geneformer_v1") / V1_NAME_MAP
    if rec in BUNDLED_NAME_MAPS:
        return rec
    if Path(rec).is_file():
        return Path(rec)
    log.warning("the cells were tokenized with --gene-name-map %s, which no longer exists; target symbols "
                "resolve through the table of the token dictionary's species instead (pass --gene-name-map "
                "to choose)", rec)
    return None
