"""Perturbation plans: which token sequences to run for each cell, and how they align to the original.

A *variant* of a cell is described by ``src``: for each position of the perturbed sequence, the
position in the original sequence its token comes from. Every perturbation Geneformer defines is such
a gather (delete drops positions; overexpress / inhibit / activate permute the gene positions), so the
engines and readouts only ever need ``src`` plus the original positions of the perturbed genes.

Semantics (Geneformer's in-silico perturbation, see ``shared/README.md``)
-------------------------------------------------------------------------
Ranks below count *gene* tokens only (special tokens ``<cls>``/``<eos>``/``<pad>``/``<mask>`` are never
perturbed and keep their slots: ``<cls>`` stays first, ``<eos>`` stays last).

``delete``
    The gene's token is removed; later tokens move up one position (the sequence gets shorter).
``overexpress``
    The gene moves to rank 1 (position 0, or position 1 after ``<cls>``); genes ranked above it move down
    one. Several genes perturbed together go to the front in the order they were listed (an anchor
    first), as Geneformer's ``overexpress_indices``.
``activate`` / ``inhibit``
    Geneformer documents (but has not released) these as quantile moves: with bin width ``q`` the
    ranking of ``n`` genes is cut into ``ceil(1/q)`` bins of width ``q*n``; a gene in bin ``b`` (0 = top)
    moves ``steps`` bins up (activate, to bin ``b-steps``) or down (inhibit, ``b+steps``), to the middle
    of that bin, i.e. to gene rank ``floor((b'+0.5)*q*n)`` clipped to ``[0, n-1]``; past the top bin
    ``activate`` moves it to rank 0, past the bottom bin ``inhibit`` moves it to rank ``n-1``. The default
    ``q = 0.25, steps = 1`` is one quartile, Geneformer's ``perturb_rank_shift=1``; its ``2`` and ``3``
    are ``steps=2, 3``. Several genes moved together are placed at their target ranks in order of
    target rank (ties: the order they were listed); all other genes keep their relative order.

A move that leaves the cell unchanged (overexpressing the top gene, activating the gene at rank 0,
inhibiting the last one) is not a perturbation: it is skipped and reported. Perturbations of every gene
of a cell are skipped and reported too (nothing is left to compare: a delete would empty the cell, a
move would be a no-op).

Absent genes: a single gene the cell lacks, or a group (pair, or a whole list perturbed together) with
a member it lacks, is skipped and reported, never an error, except for ``overexpress`` with
``insert_absent=True`` (Geneformer's): the genes the cell lacks are *inserted* at the front (after
``<cls>``, in the listed order with the group's present members) and the cell is cut to the model's
``max_len`` from its end, keeping ``<eos>``. Inserted genes have source positions ``L + j`` (``j``:
index into the block's ``inserted`` tokens); original genes cut by the overflow are absent from
``src``, so the readouts leave them out of the original cell too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

PERTURBATIONS = ("delete", "overexpress", "inhibit", "activate")


@dataclass
class VariantBlock:
    """Variants of one cell that share one length (they batch without padding).

    Attributes
    ----------
    src
        ``(V, L')`` int64: original position of each token of each variant.
    perturbed
        ``(V, m)`` int64: original positions of the perturbed genes (``m`` genes per variant).
    new_pos
        ``(V, m)`` int64: their positions in the variant (``-1`` when deleted).
    tokens
        ``(V, m)`` int64: their token ids.
    inserted
        ``(k,)`` int64: tokens of genes inserted by these variants (source positions ``L..L+k-1``).
    inserted_values
        ``(k,)`` float32: their values, for cells with values (GeneCompass: an overexpressed gene is an
        inserted row carrying its raised value, see :mod:`.genecompass`); ``None`` otherwise.
    """

    src: np.ndarray
    perturbed: np.ndarray
    new_pos: np.ndarray
    tokens: np.ndarray
    inserted: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    inserted_values: np.ndarray | None = None

    @property
    def n_variants(self) -> int:
        return int(self.src.shape[0])

    @property
    def length(self) -> int:
        return int(self.src.shape[1])

    def take(self, rows: slice | np.ndarray) -> VariantBlock:
        return VariantBlock(self.src[rows], self.perturbed[rows], self.new_pos[rows], self.tokens[rows],
                            self.inserted, self.inserted_values)


@dataclass
class CellPlan:
    """All variants planned for one cell, plus what was skipped and why.

    ``values`` (``(L,)`` float32, beside ``input_ids``) and ``species`` are set for GeneCompass cells only.
    """

    cell_index: int
    input_ids: np.ndarray
    special: np.ndarray  # (L,) bool: special-token positions (never perturbed, never pooled)
    blocks: list[VariantBlock] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    values: np.ndarray | None = None
    species: int = 0

    @property
    def n_variants(self) -> int:
        return sum(b.n_variants for b in self.blocks)

    @property
    def gene_slots(self) -> np.ndarray:
        return np.flatnonzero(~self.special)


def target_rank(rank: int, n_genes: int, perturbation: str, rank_shift: float, steps: int = 1) -> int:
    """Gene rank (0-based, specials excluded) a gene at ``rank`` moves to; see the module docstring."""
    if perturbation == "overexpress":
        return 0
    if perturbation not in ("activate", "inhibit"):
        msg = f"target_rank is defined for moves, not {perturbation!r}"
        raise ValueError(msg)
    if not 0 < rank_shift <= 1:
        msg = f"rank_shift={rank_shift} must be a fraction of the cell's length in (0, 1]"
        raise ValueError(msg)
    # exact rational arithmetic: with floats, 0.1 * 8 > 0.8 puts rank 4 of 8 in decile bin 4 instead of 5
    q = Fraction(float(rank_shift)).limit_denominator(1_000_000)  # float(): numpy scalars too
    n_bins = math.ceil(1 / q)
    b = min(math.floor(rank / (q * n_genes)), n_bins - 1)
    if steps < 1:
        msg = f"steps={steps}: move by at least one bin"
        raise ValueError(msg)
    t = b - steps if perturbation == "activate" else b + steps
    if t < 0:
        return 0
    if t >= n_bins:
        return n_genes - 1
    return int(min(max(math.floor((t + Fraction(1, 2)) * q * n_genes), 0), n_genes - 1))


def _move_order(n_genes: int, ranks: Sequence[int], targets: Sequence[int]) -> np.ndarray:
    """New gene order (as original gene ranks) after moving ``ranks`` to ``targets``."""
    rest = list(np.delete(np.arange(n_genes), list(ranks)))
    order = sorted(range(len(ranks)), key=lambda i: (targets[i], i))  # ties: listed order
    prev = -1
    for i in order:
        at = min(max(targets[i], prev + 1), len(rest))
        rest.insert(at, ranks[i])
        prev = at
    return np.asarray(rest, dtype=np.int64)


def build_variant(
    special: np.ndarray, positions: Sequence[int], perturbation: str, *, rank_shift: float = 0.25,
    steps: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """``src`` and the new positions of the perturbed genes for one variant.

    Parameters
    ----------
    special
        ``(L,)`` bool mask of special-token positions of the cell.
    positions
        Original positions of the genes perturbed together.
    perturbation
        One of :data:`PERTURBATIONS`.
    rank_shift
        Bin width (fraction of the cell's gene count) for ``activate`` / ``inhibit``.
    steps
        Bins to move by for ``activate`` / ``inhibit``.
    """
    L = special.shape[0]
    pos = np.asarray(positions, dtype=np.int64)
    if perturbation == "delete":
        src = np.delete(np.arange(L, dtype=np.int64), pos)
        return src, np.full(len(pos), -1, dtype=np.int64)
    slots = np.flatnonzero(~special)
    n = len(slots)
    ranks = np.searchsorted(slots, pos)
    targets = [target_rank(int(r), n, perturbation, rank_shift, steps) for r in ranks]
    order = _move_order(n, [int(r) for r in ranks], targets)
    src = np.arange(L, dtype=np.int64)
    src[slots] = slots[order]
    inv = np.empty(L, dtype=np.int64)
    inv[src] = np.arange(L)
    return src, inv[pos]


def build_insertion(special: np.ndarray, members: Sequence[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``src`` and new positions for overexpressing ``members`` (source positions; ``>= L``: inserted).

    All members go to the front (after a leading special token) in the listed order; the other genes
    follow in their order; the sequence is cut to ``max_len`` by dropping genes from the end, before
    any trailing special token.
    """
    L = special.shape[0]
    mem = [int(m) for m in members]
    spec = np.flatnonzero(special)
    head = [0] if L and special[0] else []
    tail = [int(p) for p in spec if p not in head]
    body = mem + [int(p) for p in np.flatnonzero(~special) if p not in set(mem)]
    over = len(head) + len(body) + len(tail) - max_len
    if over > 0:
        body = body[:len(body) - over]
    src = np.asarray(head + body + tail, dtype=np.int64)
    return src, np.asarray([len(head) + i for i in range(len(mem))], dtype=np.int64)


def _block(special: np.ndarray, ids: np.ndarray, groups: list[tuple[int, ...]], perturbation: str,
           variants: list[tuple[np.ndarray, np.ndarray]] | None) -> VariantBlock:
    if variants is None:
        # vectorised fast path for single-gene delete screens (2,048 variants of 2,047 tokens per cell)
        L = special.shape[0]
        p = np.asarray([g[0] for g in groups], dtype=np.int64)
        keep = np.ones((len(p), L), dtype=bool)
        keep[np.arange(len(p)), p] = False
        src = np.nonzero(keep)[1].reshape(len(p), L - 1)
        pert = p[:, None]
        return VariantBlock(src, pert, np.full_like(pert, -1), ids[pert])
    pert = np.asarray(groups, dtype=np.int64)
    return VariantBlock(np.stack([v[0] for v in variants]), pert, np.stack([v[1] for v in variants]), ids[pert])


GeneSpec = str | int | Sequence[int | str]


def plan_cell(
    input_ids: np.ndarray,
    cell_index: int,
    *,
    perturbation: str,
    groups: Iterable[tuple[int, ...]] | None,
    special_token_ids: Iterable[int],
    anchor: int | None = None,
    rank_shift: float = 0.25,
    steps: int = 1,
    insert_absent: bool = False,
    max_len: int | None = None,
) -> CellPlan:
    """Plan the variants of one cell.

    Parameters
    ----------
    input_ids
        The cell's token ids (``(L,)``).
    cell_index
        Identifier carried into the results.
    perturbation
        One of :data:`PERTURBATIONS`.
    groups
        Token-id groups to perturb together (a 1-tuple is a single gene); ``None`` means every gene of
        the cell, one at a time (``genes="all"``).
    special_token_ids
        Token ids that are never perturbed nor pooled.
    anchor
        With ``groups=None``: perturb this token together with each other gene of the cell (pairs).
    rank_shift, steps
        Bin width and number of bins moved for ``activate`` / ``inhibit`` (see the module docstring).
    insert_absent, max_len
        ``overexpress``: insert genes the cell lacks at the front, cutting the cell to ``max_len`` tokens
        (the model's input size); otherwise such targets are skipped.
    """
    if insert_absent and perturbation != "overexpress":
        insert_absent = False
    if perturbation not in PERTURBATIONS:
        msg = f"perturbation={perturbation!r}; choose one of {PERTURBATIONS}"
        raise ValueError(msg)
    ids = np.asarray(input_ids, dtype=np.int64)
    special_token_ids = [int(t) for t in special_token_ids]
    special = np.isin(ids, np.asarray(special_token_ids, dtype=np.int64))
    plan = CellPlan(int(cell_index), ids, special)
    gene_pos = np.flatnonzero(~special)
    first = {}
    for p in gene_pos[::-1]:  # first occurrence wins if a token repeats
        first[int(ids[p])] = int(p)
    if groups is None:
        if anchor is None:
            pos_groups = [(int(p),) for p in gene_pos]
        elif anchor not in first:
            plan.skipped.append({"cell_index": plan.cell_index, "gene_tokens": [int(anchor)],
                                 "reason": "anchor gene not expressed in cell"})
            pos_groups = []
        else:
            a = first[anchor]
            pos_groups = [(a, int(p)) for p in gene_pos if p != a]  # anchor first (overexpress order)
    else:
        pos_groups = []
        inserts: list[tuple[int, ...]] = []
        special_set = {int(t) for t in ids[special]} | {int(t) for t in special_token_ids}
        for g in groups:
            if any(int(t) in special_set for t in g):
                plan.skipped.append({"cell_index": plan.cell_index, "gene_tokens": [int(t) for t in g],
                                     "reason": "special tokens are never perturbed"})
                continue
            missing = [t for t in g if t not in first]
            if missing and insert_absent:
                inserts.append(tuple(int(t) for t in g))
                continue
            if missing:
                plan.skipped.append({"cell_index": plan.cell_index, "gene_tokens": [int(t) for t in g],
                                     "reason": "gene not expressed in cell" if len(g) == 1
                                     else f"group members not expressed in cell: {missing}"})
                continue
            pos_groups.append(tuple(first[t] for t in g))
    by_size: dict[int, list[tuple[int, ...]]] = {}
    for g in pos_groups:
        by_size.setdefault(len(g), []).append(g)
    for _, gs in sorted(by_size.items()):
        if len(gene_pos) - len(gs[0]) < 1:
            # nothing left to read out: a delete empties the cell, a move is a no-op whose mean-pooled
            # cosine over the other genes is NaN (and would poison the gene statistics)
            reason = "cell would have no genes left" if perturbation == "delete" else "no other gene in cell"
            plan.skipped.extend({"cell_index": plan.cell_index, "gene_tokens": [int(ids[p]) for p in g],
                                 "reason": reason} for g in gs)
            continue
        if perturbation == "delete":
            if all(len(g) == 1 for g in gs):
                plan.blocks.append(_block(special, ids, gs, perturbation, None))
                continue
            variants = [build_variant(special, g, perturbation) for g in gs]
        else:
            variants, moved = [], []
            for g in gs:
                src, new = build_variant(special, g, perturbation, rank_shift=rank_shift, steps=steps)
                if np.array_equal(src, np.arange(len(src))):
                    # e.g. overexpressing the top gene: not a perturbation (a zero shift would enter the stats)
                    plan.skipped.append({"cell_index": plan.cell_index, "gene_tokens": [int(ids[p]) for p in g],
                                         "reason": "no-op: already at its destination"})
                    continue
                variants.append((src, new))
                moved.append(g)
            gs = moved
            if not gs:
                continue
        plan.blocks.append(_block(special, ids, gs, perturbation, variants))
    if groups is not None and inserts:
        _plan_insertions(plan, inserts, first, max_len if max_len is not None else len(ids) + max(map(len, inserts)))
    return plan


def _plan_insertions(plan: CellPlan, groups: list[tuple[int, ...]], first: dict[int, int], max_len: int) -> None:
    """Blocks (one per group size and length) of overexpressions that insert absent genes."""
    L = len(plan.input_ids)
    inserted: dict[int, int] = {}
    by_shape: dict[tuple[int, int], list] = {}
    for g in groups:
        members = [first[t] if t in first else L + inserted.setdefault(t, len(inserted)) for t in g]
        src, new = build_insertion(plan.special, members, max_len)
        by_shape.setdefault((len(g), len(src)), []).append((src, new, members, g))
    ins = np.asarray(list(inserted), dtype=np.int64)
    for _, vs in sorted(by_shape.items()):
        plan.blocks.append(VariantBlock(np.stack([v[0] for v in vs]), np.asarray([v[2] for v in vs], dtype=np.int64),
                                        np.stack([v[1] for v in vs]), np.asarray([v[3] for v in vs], dtype=np.int64),
                                        ins))
