"""GeneCompass's four prior-knowledge tables for a model trained from scratch (``--knowledge``).

Two input forms per table, both mapped onto the token dictionary's rows:

- ``NAME=PKL``: one pickle of gene id -> vector, keyed like the token dictionary;
- ``NAME_human=PKL,NAME_mouse=PKL`` plus ``id2name=PKL``: GeneCompass's released files, each a pickle of
  gene *symbol* -> vector for one species, and its id -> symbol pickle. As GeneCompass's own loader does, an
  ENSG id reads the human file and an ENSMUSG id the mouse file, both through its symbol.

A dictionary gene a table does not cover gets a zero row (GeneCompass's loader stops there instead); the
counts are logged. ``<pad>``/``<mask>`` rows are always zero.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from .._errors import InputFileError, UsageError
from ..model.genecompass import KNOWLEDGE
from ..vocab.dictionaries import load_pickle_dict

log = logging.getLogger("scfm_fast")

SPECIES_PARTS = ("human", "mouse")
ID2NAME = "id2name"


def species_of(gene_id: str) -> str | None:
    """``"human"`` for an ENSG id, ``"mouse"`` for an ENSMUSG id, else None (GeneCompass's id rule)."""
    if gene_id.startswith("ENSMUSG"):
        return "mouse"
    if gene_id.startswith("ENSG"):
        return "human"
    return None


def parse_knowledge(spec: str | Mapping[str, str] | None) -> dict[str, str] | None:
    """``"promoter=A.pkl,..."`` (or a mapping) -> dict, checking the names.

    Names: a table (``promoter``, ``co_exp``, ``gene_family``, ``peca_grn``), a table with ``_human`` /
    ``_mouse`` (GeneCompass's per-species symbol files), or ``id2name``.
    """
    if spec is None:
        return None
    allowed = {*KNOWLEDGE, *(f"{k}_{s}" for k in KNOWLEDGE for s in SPECIES_PARTS), ID2NAME}
    if isinstance(spec, Mapping):
        pairs = [(str(k), str(v)) for k, v in spec.items()]
    else:
        pairs = [p.strip().partition("=")[::2] for p in spec.split(",") if p.strip()]
    out: dict[str, str] = {}
    for name, path in pairs:
        if name not in allowed or not path:
            msg = (f"--knowledge {spec!r}: give NAME=PKL pairs with NAME in {', '.join(KNOWLEDGE)} (a pickle of gene "
                   f"id -> vector), or NAME_human=/NAME_mouse= (symbol -> vector) with id2name= (gene id -> symbol)")
            raise UsageError(msg)
        if name in out:
            msg = f"--knowledge {spec!r}: {name} is given twice"
            raise UsageError(msg)
        out[name] = path
    return out


def _check_names(files: Mapping[str, str], needed: Sequence[str]) -> None:
    given = {n.rsplit("_", 1)[0] if n.endswith(("_human", "_mouse")) else n for n in files if n != ID2NAME}
    missing, extra = sorted(set(needed) - given), sorted(given - set(needed))
    if missing or extra:
        msg = (f"--knowledge: the model uses the tables {list(needed)}; "
               + (f"missing {missing}" if missing else f"not used: {extra}")
               + " (give NAME=PKL, a pickle of gene id -> vector, or NAME_human=/NAME_mouse= with id2name= for "
               "each; or switch the table off in --config)")
        raise UsageError(msg)
    for name in needed:
        if name in files and any(f"{name}_{s}" in files for s in SPECIES_PARTS):
            msg = f"--knowledge: give {name} either as {name}= or as {name}_human=/{name}_mouse=, not both"
            raise UsageError(msg)
    per_species = any(n.endswith(("_human", "_mouse")) for n in files)
    if per_species != (ID2NAME in files):
        msg = ("--knowledge: the per-species files (NAME_human=, NAME_mouse=) are keyed by gene symbol and need "
               "id2name=PKL (gene id -> symbol)" if per_species else
               "--knowledge: id2name= is only used with per-species files (NAME_human=, NAME_mouse=)")
        raise UsageError(msg)


def knowledge_tables(files: Mapping[str, str], token_of: Mapping[str, int], *, vocab_size: int,
                     needed: Sequence[str]) -> dict[str, np.ndarray]:
    """``[vocab, dim]`` float32 tables of the ``needed`` names from ``files`` (see the module docstring).

    Raises
    ------
    UsageError
        A table the model needs is missing, one is given that it does not use, or the forms are mixed.
    InputFileError
        An unreadable file, vectors of different widths, or a file that covers no gene of the dictionary
        (e.g. keyed by symbols but given as ``NAME=``).
    """
    _check_names(files, needed)
    id2name = load_pickle_dict(files[ID2NAME], what="id -> symbol map (id2name)") if ID2NAME in files else {}
    genes = [(g, int(t)) for g, t in token_of.items() if g not in ("<pad>", "<mask>")]
    out: dict[str, np.ndarray] = {}
    width_of: dict[int, str] = {}  # vector width -> a file that has it
    for name in needed:
        if name in files:  # keyed by gene id
            srcs = {None: files[name]}
            keys = [(None, g) for g, _ in genes]
        else:  # per species, keyed by symbol through id2name
            srcs = {s: files[f"{name}_{s}"] for s in SPECIES_PARTS if f"{name}_{s}" in files}
            keys = [(species_of(g), id2name.get(g)) for g, _ in genes]
        tabs = {s: load_pickle_dict(p, what=f"{name} knowledge table") for s, p in srcs.items()}
        rows: dict[int, np.ndarray] = {}
        for (_, tok), (s, key) in zip(genes, keys):
            if s not in tabs or key not in tabs[s]:
                continue
            v = rows[tok] = np.asarray(tabs[s][key], np.float32).reshape(-1)
            width_of.setdefault(v.size, srcs[s])
            if len(width_of) > 1:
                w0 = next(w for w in width_of if w != v.size)
                msg = (f"{srcs[s]}: {key!r} has a {v.size}-d vector but {width_of[w0]} has {w0}-d ones; all four "
                       "tables must share one width")
                raise InputFileError(msg)
        for s, p in srcs.items():
            if not any(tabs[s].get(key) is not None for sp, key in keys if sp == s):
                how = ("the dictionary's gene ids" if s is None else
                       f"the symbols id2name gives the dictionary's {s} ({'ENSG' if s == 'human' else 'ENSMUSG'}) ids")
                msg = (f"{p}: none of its {len(tabs[s])} keys (e.g. {next(iter(tabs[s]))!r}) names a gene of the token "
                       f"dictionary; key it by {how}")
                raise InputFileError(msg)
        t = np.zeros((vocab_size, next(iter(width_of))), np.float32)
        for tok, v in rows.items():
            t[tok] = v
        out[name] = t
        if len(rows) < len(genes):
            log.info("--knowledge %s: %d of %d dictionary genes have no vector (zero rows)", name,
                     len(genes) - len(rows), len(genes))
    return out
