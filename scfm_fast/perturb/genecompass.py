"""In-silico perturbation of GeneCompass cells: plans whose genes carry values, and the two engines' hooks.

A GeneCompass cell is a list of ``(gene, value)`` pairs ordered by value (highest first) plus a species.
Its plan (:func:`plan_genecompass_cell`) is an ordinary :class:`~.plan.CellPlan` whose position 0 is the
species row (the :data:`SPECIES_ROW` sentinel, a special token: never perturbed, never mean-pooled, the
``cls`` readout), so the shared readouts (:func:`.exact.readout`, :func:`.reference.reference_block`) apply
unchanged; ``plan.values`` holds each position's value.

Semantics (GeneCompass's ``perturb_delete_chipseq.py``, with its bugs fixed)
---------------------------------------------------------------------------
``delete``
    The gene's ``(id, value)`` pair is removed; later genes move up one position.
``overexpress``
    The gene's value is multiplied by ``1e4`` (in float32) and the genes are re-sorted by value, highest
    first, with a stable sort (ties keep their order, as Python's ``sorted``). The raised gene is an
    *inserted* source row (``block.inserted`` / ``block.inserted_values``) at its new position, so the
    exact engine's embedding tables stay per (source, offset). Genes perturbed together are all raised,
    then sorted once (GeneCompass's loop re-sorts after each gene but keeps the old indices, so its second
    gene is whichever gene slid into that index: a bug). Overexpressing the top gene is a perturbation
    here (its value changes); GeneCompass's ``"all"`` screen skips position 0 (a Geneformer ``<cls>``
    habit). A gene the cell lacks has no value to raise and is skipped, as GeneCompass does.
``inhibit`` / ``activate``
    Not defined by GeneCompass (refused).

Targets of a joint (human + mouse) dictionary resolve in each cell's own species (:class:`SpeciesTargets`):
``"Actb"`` is mouse Actb in mouse cells and, in human cells, a target they cannot hold (skipped and
recorded, like a gene a cell does not express), never human ACTB.

Readouts are read at the last layer by default, as the script reads (:data:`.screen.FAMILY_LAYERS`), and
aligned by gene (GeneCompass pairs per-gene cosines by position, off by one after a deleted gene, and
averages its cell value over pads); see README's perturbation section.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._errors import GeneMatchError, UsageError
from ..embed.genecompass import is_genecompass
from ..store.cells import CellSource
from ._results import BlockResult
from .exact import ExactEngine
from .plan import CellPlan, VariantBlock, plan_cell
from .reference import reference_block

#: token id of the species row in a GeneCompass plan (position 0; never a gene)
SPECIES_ROW = -1
#: GeneCompass's overexpression factor on the gene's value
OVEREXPRESS_FACTOR = 1e4


def check_options(model: Any, *, perturbation: str, engine: str) -> None:
    """Refuse what a GeneCompass screen cannot do (the tokens and ``no_attention_mask`` are checked by
    :func:`scfm_fast.embed.genecompass.check_family`, as for ``scfm embed``)."""
    if not is_genecompass(model):
        return
    if perturbation not in ("delete", "overexpress"):
        msg = (f"perturbation={perturbation!r}: GeneCompass defines delete and overexpress (value x 1e4, "
               "re-sorted) only; its cells are ordered by value, so a rank shift has no value to give the gene")
        raise UsageError(msg)
    if engine == "approx":
        msg = ("mode='approx' does not handle GeneCompass cells (values and the species row); use the exact "
               "engine (--mode exact, the default)")
        raise UsageError(msg)
    if not model.gcfg.use_cls_token:
        msg = "this GeneCompass checkpoint has no species row (use_cls_token false); perturbation needs it"
        raise UsageError(msg)


def iter_cells(src: CellSource, *, pad: int | None,
               part_cells: int = 1024) -> Iterator[tuple[int, np.ndarray, np.ndarray, int]]:
    """``(position in src, ids, values, species)`` of each cell without ``pad`` genes (GeneCompass's own
    padded layout), read ``part_cells`` cells at a time."""
    start = 0
    for part in src.parts(part_cells):
        rows = np.arange(len(part))
        species = part.species
        for k, (ids, vals) in enumerate(zip(part.take(rows), part.take_values(rows))):
            keep = ids != pad if pad is not None else slice(None)
            yield start + k, ids[keep], vals[keep], 0 if species is None else int(species[k])
        start += len(part)


def _raise_and_sort(plan: CellPlan, groups: np.ndarray) -> VariantBlock:
    """Overexpress variants (one per row of ``groups``, plan positions) of ``plan``; see the module docstring."""
    vals = plan.values
    L = len(vals)
    inserted: dict[int, int] = {}
    srcs, news = [], []
    for g in groups:
        key = vals.copy()
        key[g] = vals[g] * np.float32(OVEREXPRESS_FACTOR)  # exact in float32, as float64 then rounded
        order = 1 + np.argsort(-key[1:], kind="stable")  # position 0: the species row stays
        src = np.concatenate([[0], order]).astype(np.int64)
        new = np.asarray([int(np.flatnonzero(src == p)[0]) for p in g], dtype=np.int64)
        for p in g:  # the raised gene is a new (token, value) row
            src[src == p] = L + inserted.setdefault(int(p), len(inserted))
        srcs.append(src)
        news.append(new)
    pos = np.fromiter(inserted, dtype=np.int64, count=len(inserted))
    raised = (vals[pos] * np.float32(OVEREXPRESS_FACTOR)).astype(np.float32)
    return VariantBlock(np.stack(srcs), groups, np.stack(news), plan.input_ids[groups], plan.input_ids[pos], raised)


#: GeneCompass species code -> name (messages)
SPECIES_NAMES = {0: "human", 1: "mouse"}


@dataclass
class SpeciesTargets:
    """A screen's targets over a joint dictionary, resolved in each species' own symbol table.

    Built by :func:`species_targets`. ``groups[s]`` / ``anchor[s]`` are the token groups and anchor for cells
    of species ``s`` (``groups[s]`` is ``None`` for ``genes="all"``); ``missing[s]`` lists the targets
    (names, and the tokens they name in the other species) that name no gene of species ``s``: each cell
    of ``s`` records them as skipped.
    """

    groups: dict[int, list[tuple[int, ...]] | None]
    anchor: dict[int, int | None] = field(default_factory=dict)
    missing: dict[int, list[tuple[list[str], list[int]]]] = field(default_factory=dict)
    anchor_name: str | None = None

    def union(self) -> tuple[list[tuple[int, ...]] | None, list[str]]:
        """All species' groups (``None`` for ``genes="all"``) and no unresolved names: ``resolve``'s shape."""
        if any(g is None for g in self.groups.values()):
            return None, []
        return list(dict.fromkeys(g for gs in self.groups.values() for g in gs or [])), []

    def first_anchor(self) -> int | None:
        return next((a for a in self.anchor.values() if a is not None), None)

    def for_cell(self, species: int, cell_index: int) -> tuple[list[tuple[int, ...]] | None, int | None, list[dict]]:
        """``(groups, anchor, skip records)`` of one cell of ``species``."""
        name = SPECIES_NAMES.get(species, f"species {species}")
        why = f"(GeneCompass perturbs within a species; this cell is {name})"
        skips = [{"cell_index": cell_index, "gene_tokens": toks, "genes": names,
                  "reason": f"{'+'.join(names)} names no {name} gene of the token dictionary {why}"}
                 for names, toks in self.missing.get(species, [])]
        if self.anchor_name is not None and self.anchor.get(species) is None:
            other = [a for a in self.anchor.values() if a is not None]
            skips.append({"cell_index": cell_index, "gene_tokens": other, "genes": [self.anchor_name],
                          "reason": f"anchor gene {self.anchor_name!r} names no {name} gene {why}"})
            return [], None, skips  # no pairs (groups=None would perturb every gene alone)
        return self.groups.get(species, []), self.anchor.get(species), skips


def species_targets(resolver: Any, genes: Any, *, combine: bool, anchor: int | str | None,
                    vocab_size: int) -> SpeciesTargets | None:
    """``genes`` / ``anchor`` resolved per species when ``resolver`` has a joint dictionary
    (:meth:`~scfm_fast.vocab.targets.TargetResolver.by_species`), else ``None`` (one resolution for all cells).

    A group (or, with ``combine``, the whole list) applies to a species' cells when every member names a
    gene of that species. Token ids past the model's ``vocab_size`` name no gene.

    Raises
    ------
    GeneMatchError
        A target that names a gene of neither species.
    UsageError
        An ``anchor`` that names a gene of neither species; a special token among the targets.
    """
    per = resolver.by_species()
    if per is None or (isinstance(genes, str) and genes == "all" and anchor is None):
        return None

    def tok(r: Any, g: Any) -> int | None:
        t = r.resolve_one(g)
        return t if t is not None and 0 <= t < vocab_size else None

    out = SpeciesTargets({s: None for s in per})
    if not (isinstance(genes, str) and genes == "all"):
        items = [genes] if isinstance(genes, (str, int, np.integer)) else list(genes)
        groups = [[m] if isinstance(m, (str, int, np.integer)) else list(m) for m in items]
        toks = {s: [[tok(r, m) for m in g] for g in groups] for s, r in per.items()}
        unknown = [str(m) for j, g in enumerate(groups) for i, m in enumerate(g)
                   if all(toks[s][j][i] is None for s in per)]
        if unknown:  # a typo must not run as a screen of the other genes
            msg = (f"genes not in the token dictionary / model vocabulary: {unknown[:20]}"
                   f"{' ...' if len(unknown) > 20 else ''}; give symbols of human or mouse genes (each resolves in "
                   "the cells of its own species), Ensembl IDs or token ids the dictionary holds")
            raise GeneMatchError(msg)
        for s in per:
            ok = [tuple(int(t) for t in ts) for ts in toks[s] if None not in ts]
            miss = [([str(m) for m in g], sorted({t for o in per if o != s for t in toks[o][j] if t is not None}))
                    for j, (g, ts) in enumerate(zip(groups, toks[s])) if None in ts]
            if combine and miss:  # the whole list as one group: in a species only if every member is its gene
                ok, miss = [], [([str(m) for g in groups for m in g], sorted({t for _, ts in miss for t in ts}))]
            elif combine:
                ok = [tuple(dict.fromkeys(t for g in ok for t in g))]
            out.groups[s], out.missing[s] = ok, miss
    if anchor is not None:
        out.anchor_name = str(anchor)
        out.anchor = {s: tok(r, anchor) for s, r in per.items()}
        if all(a is None for a in out.anchor.values()):
            msg = (f"anchor gene {anchor!r} (--anchor) is not in the token dictionary: give a symbol of a human or "
                   "mouse gene, an Ensembl ID or a token id")
            raise UsageError(msg)
        for s, a in out.anchor.items():
            if a is not None and out.groups[s] is not None:
                out.groups[s] = [tuple(dict.fromkeys((a, *g))) for g in out.groups[s]]
    return out


def plan_genecompass_cell(ids: np.ndarray, values: np.ndarray, cell_index: int, *, species: int, perturbation: str,
                          groups: Iterable[tuple[int, ...]] | None, special_token_ids: Iterable[int],
                          anchor: int | None = None, targets: SpeciesTargets | None = None) -> CellPlan:
    """Plan the variants of one GeneCompass cell (``ids`` and ``values`` in the cell's order).

    Which genes are perturbed together (groups, pairs with ``anchor``, absent genes skipped) is decided by
    :func:`~.plan.plan_cell`; overexpress variants are then built by value (see the module docstring).
    ``targets`` (a joint dictionary) replaces ``groups`` and ``anchor`` by those of the cell's species and
    records the targets naming no gene of it as skipped.
    """
    extra: list[dict] = []
    if targets is not None:
        groups, anchor, extra = targets.for_cell(int(species), cell_index)
    ids = np.concatenate([[SPECIES_ROW], np.asarray(ids, dtype=np.int64)])
    values = np.concatenate([[0.0], np.asarray(values, dtype=np.float32)]).astype(np.float32)
    special = [SPECIES_ROW, *(int(t) for t in special_token_ids)]
    # groups resolve as for a delete: positions of present members in listed order, absent ones skipped
    plan = plan_cell(ids, cell_index, perturbation="delete", groups=groups, special_token_ids=special,
                     anchor=anchor)
    plan.values, plan.species = values, int(species)
    plan.skipped[:0] = extra
    if perturbation == "overexpress":
        for rec in plan.skipped:
            if rec["reason"] == "cell would have no genes left":
                rec["reason"] = "no other gene in cell"
        plan.blocks = [_raise_and_sort(plan, b.perturbed) for b in plan.blocks]
    elif perturbation != "delete":
        msg = f"perturbation={perturbation!r}: GeneCompass cells take delete or overexpress"
        raise UsageError(msg)
    return plan


def _source_values(plan: CellPlan, block: VariantBlock | None) -> np.ndarray:
    extra = block.inserted_values if block is not None and block.inserted_values is not None else np.zeros(
        0 if block is None else len(block.inserted), np.float32)
    return np.concatenate([plan.values, extra]).astype(np.float32)


def _source_ids(plan: CellPlan, block: VariantBlock | None) -> np.ndarray:
    ids = plan.input_ids if block is None else np.concatenate([plan.input_ids, block.inserted])
    return np.where(ids == SPECIES_ROW, 0, ids)  # the species row has no token: any id, replaced below


class GeneCompassExactEngine(ExactEngine):
    """The exact engine on a GeneCompass model: embedding rows are functions of (gene, value, position).

    Parameters
    ----------
    model
        A :class:`~scfm_fast.model.genecompass.GeneCompassModel` on ``device``.
    no_attention_mask, pad_to
        GeneCompass-script mode: every variant is followed by ``(0, 0.0)`` pads up to ``pad_to`` genes
        (default: the model's positions) that attend like genes.
    **kw
        As :class:`~.exact.ExactEngine`.
    """

    def __init__(self, model: Any, *, no_attention_mask: bool = False, pad_to: int | None = None, **kw: Any) -> None:
        super().__init__(model.bert, **kw)
        self.gc = model
        self.pad_to = (pad_to or model.config.max_position_embeddings) if no_attention_mask else None

    def _gene_rows(self, plan: CellPlan, tok: torch.Tensor, val: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        sp = torch.full_like(tok, plan.species)
        return self.gc.bert.embeddings(tok, val, sp, pos.clamp(0, self.P.max_pos - 1), self.gc.emb_warmup.alpha)

    def embed_sources(self, plan: CellPlan, block: VariantBlock | None, sources: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        dev = self.device
        tok = torch.as_tensor(_source_ids(plan, block), device=dev)[sources]
        val = torch.as_tensor(_source_values(plan, block), device=dev)[sources]
        rows = self._gene_rows(plan, tok, val, positions - 1)  # plan position 0 is the species row
        sp_row = self.gc.bert.cls_embedding.weight[plan.species].to(rows.dtype)
        return torch.where((sources == 0)[:, None], sp_row, rows)

    def tail_rows(self, plan: CellPlan, length: int) -> torch.Tensor | None:
        if self.pad_to is None or length - 1 >= self.pad_to:
            return None
        pos = torch.arange(length - 1, self.pad_to, device=self.device)
        return self._gene_rows(plan, torch.zeros_like(pos), torch.zeros(len(pos), device=self.device), pos)

    @torch.no_grad()
    def unperturbed_plan(self, plan: CellPlan) -> torch.Tensor:
        """Readout-layer states ``(L, H)`` (fp32) of the unperturbed cell, species row first."""
        from ..model.layers import autocast_ctx

        L = len(plan.input_ids)
        ar = torch.arange(L, device=self.device)
        with autocast_ctx(self.device, self.dtype):
            h = self.embed_sources(plan, None, ar, ar)
            tail = self.tail_rows(plan, L)
            if tail is not None:
                h = torch.cat([h, tail])
            h = self.P.run(h[None], self.n_layers)
        return h[0, :L].float()


class GeneCompassReferenceEngine:
    """The oracle on a GeneCompass model: one :meth:`~GeneCompassModel.forward_padded` call per variant."""

    def __init__(self, model: Any, *, layer: int, no_attention_mask: bool = False, pad_to: int | None = None,
                 device: torch.device | None = None) -> None:
        self.model, self.layer, self.device = model, layer, device
        self.no_attention_mask = no_attention_mask
        self.pad_to = (pad_to or model.config.max_position_embeddings) if no_attention_mask else None

    def _forward(self, plan: CellPlan, block: VariantBlock | None, src: np.ndarray) -> torch.Tensor:
        genes = np.asarray(src[1:])
        ids, vals = _source_ids(plan, block)[genes], _source_values(plan, block)[genes]
        n = len(genes) if self.pad_to is None else self.pad_to
        tok, val = torch.zeros(1, n, dtype=torch.long), torch.zeros(1, n)
        tok[0, :len(genes)], val[0, :len(genes)] = torch.from_numpy(ids), torch.from_numpy(vals)
        dev = self.device or next(self.model.parameters()).device
        with torch.no_grad():
            h = self.model.forward_padded(tok.to(dev), val.to(dev), torch.tensor([plan.species], device=dev),
                                          layer=self.layer, no_attention_mask=self.no_attention_mask)
        return h[0, :len(src)].float()

    def unperturbed_plan(self, plan: CellPlan) -> torch.Tensor:
        """Readout-layer states ``(L, H)`` (fp32) of the unperturbed cell, species row first."""
        return self._forward(plan, None, np.arange(len(plan.input_ids)))

    def run_block(self, plan: CellPlan, block: VariantBlock, h0: torch.Tensor, *,
                  on_batch: Any = None, **readout: Any) -> BlockResult:
        res = reference_block(lambda s: self._forward(plan, block, s), plan, block, h0, **readout)
        if on_batch is not None:
            on_batch(block.n_variants)
        return res


def make_engine(engine: str, model: Any, *, n_layers: int, device: torch.device, dtype: torch.dtype | None,
                batch_tokens: int, layer: int, no_attention_mask: bool = False, pad_to: int | None = None) -> Any:
    """The GeneCompass engine named ``engine`` (``exact`` or ``reference``)."""
    if engine == "reference":
        return GeneCompassReferenceEngine(model, layer=layer, no_attention_mask=no_attention_mask, pad_to=pad_to,
                                          device=device)
    if engine == "exact":
        return GeneCompassExactEngine(model, n_layers=n_layers, device=device, dtype=dtype, batch_tokens=batch_tokens,
                                      no_attention_mask=no_attention_mask, pad_to=pad_to)
    msg = f"mode={engine!r}: GeneCompass models run with the exact engine (or the reference)"
    raise UsageError(msg)
