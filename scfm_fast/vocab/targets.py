"""Screen targets (``--genes``) -> token ids, by the rules the tokenizer used for the cells' genes.

A target is a token id, an Ensembl id (versioned or not), a symbol, or — for cells tokenized with
``--orthologs`` — a mouse id or symbol. Symbols go through the table the cells' tokenizer used
(:mod:`~scfm_fast.vocab.symbols`): mouse symbols stay in mouse space for a mouse-Geneformer dataset or any
dictionary of ENSMUSG ids. Each goes through :func:`~scfm_fast.vocab.gene_ids.match_gene_id`,
the tokenizer's own rule set, so "Gsta3" is the token the tokenizer gave mouse Gsta3 (its human ortholog),
a gene without a median is never a target (it never appears in cells), and the version suffix rule is
the tokenizer's. Special tokens are never targets. For a joint human + mouse (GeneCompass) dictionary,
:meth:`TargetResolver.by_species` gives one resolver per species: a symbol names a gene of the cell's own
species only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import GeneMatchError, UsageError
from .dictionaries import SPECIAL_TOKENS, GeneVocab, bundled_dir, load_pickle_dict
from .gene_ids import case_insensitive_map, load_gene_name_map, match_gene_id

log = logging.getLogger("scfm_fast")

Source = str | Path | Mapping[str, Any] | None


def _as_dict(source: Source, *, default: Path, what: str) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    return load_pickle_dict(default if source is None else source, what=what)


class TargetResolver:
    """Resolve screen targets to token ids, and token ids back to Ensembl ids.

    Parameters
    ----------
    token_dictionary
        Ensembl id -> token id (dict or pickle path); default: the bundled Geneformer V1 dictionary.
    gene_name_map
        Symbol -> Ensembl id (dict, pickle or CSV/TSV path, or a bundled table name such as
        ``"ensembl-mouse"``); default: by the species of the token dictionary's ids — the bundled mouse
        Ensembl table for ENSMUSG ids, both Ensembl tables for a joint human + mouse dictionary, else
        Geneformer V1's table (:func:`~scfm_fast.vocab.symbols.default_name_map`). The joint table resolves
        symbols per species through :meth:`by_species`.
    orthologs
        ``"mouse-to-human"``, an ortholog table path or a dict (mouse id/symbol -> human Ensembl id): the
        ``--orthologs`` the cells were tokenized with (see :meth:`for_cells`).
    gene_median
        Ensembl id -> median (dict or pickle path). Only genes in both dictionaries are tokenized, so
        only they resolve. Default: the bundled medians with the bundled token dictionary; with another
        token dictionary and no medians, every gene of that dictionary counts.
    foreign_names
        Symbol -> Ensembl id of the other species of a joint dictionary (set by :meth:`by_species`): its
        exact symbols are never matched case-insensitively here.

    Examples
    --------
    >>> r = TargetResolver()                                    # doctest: +SKIP
    >>> r.resolve_one("CD24"), r.resolve(["CD24", ("TP53", "MYC")], combine=False)  # doctest: +SKIP
    """

    def __init__(self, token_dictionary: Source = None, gene_name_map: Source = None, orthologs: Source = None, *,
                 gene_median: Source = None, foreign_names: Mapping[str, str] | None = None) -> None:
        self._tok_src, self._name_src, self._orth_src, self._med_src = (token_dictionary, gene_name_map,
                                                                        orthologs, gene_median)
        # symbols of the other species of a joint dictionary (see by_species): never matched by case here
        self._foreign = foreign_names

    @classmethod
    def for_cells(cls, cells: Any, *, token_dictionary: Source = None, gene_name_map: Source = None,
                  gene_median: Source = None) -> TargetResolver:
        """A resolver for ``cells`` (anything :func:`~scfm_fast.store.cells.open_cells` opens): their
        ``--orthologs``, the symbol table their tokenizer used (its preset's, e.g. ``ensembl-mouse`` for
        ``mouse-geneformer``; ``gene_name_map`` overrides it), and ``token_dictionary`` checked against
        the one they were tokenized with."""
        from ..store.cells import open_cells
        from .dictionaries import check_token_dictionary
        from .symbols import recorded_name_map

        src = open_cells(cells)
        if not isinstance(token_dictionary, Mapping):  # a dict given directly cannot be compared: trusted
            path = Path(token_dictionary) if token_dictionary is not None else _bundled("token_dictionary.pkl")
            check_token_dictionary(path, src.dictionary_hash, dataset=src.name)
        names = gene_name_map if gene_name_map is not None else recorded_name_map(src.config)
        return cls(token_dictionary, names, src.orthologs, gene_median=gene_median)

    # ---- dictionaries (loaded on first use) -----------------------------------------------------
    @cached_property
    def token_dict(self) -> dict[str, int]:
        d = _as_dict(self._tok_src, default=_bundled("token_dictionary.pkl"), what="token dictionary")
        return {str(k): int(v) for k, v in d.items()}

    @cached_property
    def name_map(self) -> dict[str, str]:
        if isinstance(self._name_src, Mapping):
            return {str(k): str(v) for k, v in self._name_src.items()}
        if self._name_src is None:
            from .symbols import default_name_map

            return load_gene_name_map(default_name_map(self.token_dict))
        return load_gene_name_map(self._name_src)

    @cached_property
    def ortholog_map(self) -> dict[str, str] | None:
        if self._orth_src is None or isinstance(self._orth_src, Mapping):
            return None if self._orth_src is None else dict(self._orth_src)
        from .orthologs import load_ortholog_map

        return load_ortholog_map(str(self._orth_src))

    @cached_property
    def vocab(self) -> GeneVocab:
        genes = {g: t for g, t in self.token_dict.items() if g not in SPECIAL_TOKENS}
        if self._med_src is None and self._tok_src is not None:
            medians = dict.fromkeys(genes, 1.0)  # no medians known: every dictionary gene counts
        else:
            medians = _as_dict(self._med_src, default=_bundled("gene_median_dictionary.pkl"), what="gene median dictionary")
        return GeneVocab(genes, {str(k): float(v) for k, v in medians.items()})

    @cached_property
    def _upper(self) -> dict | None:
        return case_insensitive_map(self.name_map, self.ortholog_map)

    def special_token_ids(self) -> list[int]:
        """Token ids of ``<pad>``, ``<mask>``, ``<cls>``, ``<eos>`` present in the dictionary."""
        return [self.token_dict[s] for s in SPECIAL_TOKENS if s in self.token_dict]

    def ensembl_of(self) -> dict[int, str]:
        """Token id -> Ensembl id (special tokens included, under their names)."""
        return {t: g for g, t in self.token_dict.items()}

    def by_species(self) -> dict[int, TargetResolver] | None:
        """One resolver per GeneCompass species code (0 human, 1 mouse) for a joint dictionary, else ``None``.

        Applies when the dictionary holds both ENSG and ENSMUSG ids, symbols go through the bundled joint
        table (``ensembl-human+mouse``, GeneCompass's default; a user's own table keeps one resolution for
        all cells) and no ``--orthologs`` are in use. Each resolver reads its own species' Ensembl table:
        ``"Actb"`` is mouse Actb in mouse cells and no gene of human cells (GeneCompass perturbs within a
        species); a symbol of the other species' table never matches by case (``"Actb"`` is not human
        ``ACTB``), one of neither table may (``"actb"``: each species' own Actb/ACTB, as the tokenizer
        matches case within one species). Ensembl and token ids resolve alike in both.
        """
        from .ensembl import SPECIES, ensembl_name_map
        from .symbols import dictionary_species

        if "_per_species" in self.__dict__:
            return self._per_species
        self._per_species: dict[int, TargetResolver] | None = None
        joint = self._name_src is None or (isinstance(self._name_src, str)
                                           and self._name_src == "ensembl-human+mouse")
        if not joint or self._orth_src is not None or dictionary_species(self.token_dict) != ("human", "mouse"):
            return None
        medians = self.vocab.median_of  # loaded once, shared
        out: dict[int, TargetResolver] = {}
        for sp, (_, code) in SPECIES.items():
            other = next(o for o in SPECIES if o != sp)
            out[code] = TargetResolver(self.token_dict, ensembl_name_map(sp), gene_median=medians,
                                       foreign_names=ensembl_name_map(other))
        self._per_species = out
        return out

    def symbol_of(self) -> dict[int, str]:
        """Token id -> gene symbol (the first symbol of the name map naming its Ensembl id): result labels.

        With a joint dictionary (:meth:`by_species`) each species' genes are named by its own table, so a
        symbol spelled alike in both species names both genes.
        """
        per = self.by_species()
        if per is not None:
            return {t: s for r in per.values() for t, s in r.symbol_of().items()}
        out: dict[int, str] = {}
        for sym, ens in self.name_map.items():
            t = self.token_dict.get(ens)
            if t is not None:
                out.setdefault(int(t), str(sym))
        return out

    # ---- resolution -------------------------------------------------------------------------------
    def resolve_one(self, gene: int | str) -> int | None:
        """Token id of one target, or ``None`` when it is not a tokenized gene.

        Raises
        ------
        UsageError
            ``gene`` names or is a special token (``<cls>``, its id, ...): those are never perturbed.
        """
        specials = self.special_token_ids()
        if isinstance(gene, (int, np.integer)) or str(gene).strip().lstrip("-").isdigit():
            t = int(gene)
            if t in specials:
                msg = f"target {gene!r} is the special token {self.ensembl_of()[t]}; special tokens are never targets"
                raise UsageError(msg)
            # an id names a target only if it is a tokenized gene: others never occur in cells
            g = self.ensembl_of().get(t)
            return t if g is not None and self.vocab.tokenizable(g) == t else None
        g = str(gene).strip()
        if g in SPECIAL_TOKENS:
            msg = f"target {g!r} is a special token; special tokens are never targets"
            raise UsageError(msg)
        upper = self._upper if self._foreign is None or g not in self._foreign else None
        t, _ = match_gene_id(g, self.vocab, gene_name_map=self.name_map, ortholog_map=self.ortholog_map,
                             upper_map=upper)
        return t if t >= 0 else None

    def resolve(self, genes: Any, *, combine: bool = False,
                strict: bool = False) -> tuple[list[tuple[int, ...]] | None, list[str]]:
        """Turn a ``genes=`` argument into token groups: ``(groups, unresolved)``.

        ``"all"`` -> ``(None, [])``; a gene -> ``[(tok,)]``; a list -> one group per item, an item that is a
        tuple/list being a group perturbed together, members in the order given; ``combine=True`` -> the
        whole list as one group, in list order without repeats. ``strict=True`` refuses any unresolved
        target instead of skipping it with a warning.

        Raises
        ------
        GeneMatchError
            No target resolves, or (``strict``) one does not.
        UsageError
            A special token among the targets.
        """
        if isinstance(genes, str) and genes == "all":
            return None, []
        items: Sequence = [genes] if isinstance(genes, (str, int, np.integer)) else list(genes)
        groups: list[tuple[int, ...]] = []
        unknown: list[str] = []
        for item in items:
            members = [item] if isinstance(item, (str, int, np.integer)) else list(item)
            toks = [self.resolve_one(m) for m in members]
            bad = [str(m) for m, t in zip(members, toks) if t is None]
            if bad:
                unknown.extend(bad)
                continue
            groups.append(tuple(int(t) for t in toks))
        if unknown and strict:
            msg = (f"targets {unknown[:10]} are not genes of the token dictionary (or have no median, so no cell "
                   "holds them); check the names, or the --orthologs the cells were tokenized with")
            raise GeneMatchError(msg)
        if combine and groups:
            groups = [tuple(dict.fromkeys(t for g in groups for t in g))]
        if not groups:
            msg = f"none of the requested genes {list(items)[:10]} could be resolved to token ids"
            raise GeneMatchError(msg)
        if unknown:
            log.warning("skipping %d genes not in the token dictionary: %s", len(unknown), unknown[:20])
        return groups, unknown


def _bundled(name: str) -> Path:
    return bundled_dir("geneformer_v1") / name
