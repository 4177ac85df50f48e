"""Result table of a perturbation run (shared by the reference, exact and approximate engines).

Columns
-------
``cell_index`` (int64)
    The cell's ``cell_index`` (token dataset column) or its position in the input list.
``perturbation`` (str)
    ``delete`` / ``overexpress`` / ``inhibit`` / ``activate``.
``gene_token`` (int64)
    The perturbed gene's token id; for pairs with an anchor, the non-anchor gene; for other groups ``-1``.
``gene_tokens`` (list<int64>)
    All token ids perturbed together in this variant.
``ensembl_id`` (str)
    Ensembl ID(s) of ``gene_tokens`` joined by ``+`` (``None`` where the token dictionary has no entry).
``gene_name`` (str)
    Gene symbol(s) of ``gene_tokens`` joined by ``+`` (the Ensembl ID, or the token id, where no symbol is
    known).
``n_genes`` (int64)
    Gene tokens of the unperturbed cell (special tokens excluded).
``orig_rank`` / ``new_rank`` (int64)
    0-based gene rank of ``gene_token`` (or the first member) before / after (``-1`` after a delete;
    ``orig_rank`` ``-1`` for a gene the cell lacked, inserted by ``overexpress``).
``cos_sim`` (float64)
    Perturbed vs unperturbed cell (see :func:`scfm_fast.perturb.exact.readout`): with mean pooling the
    mean of the aligned genes' own cosines (Geneformer's; ``cell_readout="pooled"``: the cosine of the
    mean-pooled embeddings), with ``<cls>`` pooling the cosine of the ``<cls>`` rows.
``shift`` (float64)
    ``1 - cos_sim``.
``target_shift`` (float64, when ``target_embedding`` is given) / ``shift_<state>`` (cell states)
    ``cos(perturbed, state) - cos(original, state)``: > 0 means the perturbation moves the cell toward
    the state.
``gene_shift_tokens`` (list<int32>) / ``gene_shift_cos`` (list<float32>, when ``gene_shifts=True``)
    Every remaining gene and the cosine similarity of its perturbed vs unperturbed embedding.

``DataFrame.attrs`` holds ``skipped`` (records of skipped (cell, gene) targets with the reason), ``mode``,
``layer`` and, for ``mode="approx"``, ``approx_error``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .plan import CellPlan, VariantBlock


@dataclass
class BlockResult:
    cos_sim: np.ndarray
    target_shift: np.ndarray | None = None
    gene_tokens: list[np.ndarray] | None = None
    gene_cos: list[np.ndarray] | None = None


@dataclass
class ResultBuilder:
    perturbation: str
    anchor: int | None
    ensembl_of: dict[int, str] | None
    rows: list[dict] = field(default_factory=list)
    cols: dict[str, list] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    target_columns: tuple[str, ...] = ()
    with_gene_shifts: bool = False
    symbol_of: dict[int, str] | None = None

    def add(self, plan: CellPlan, block: VariantBlock, res: BlockResult) -> None:
        gene_slots = plan.gene_slots
        n_genes = len(gene_slots)
        V, m = block.tokens.shape
        toks = block.tokens
        if m == 1:
            which = np.zeros(V, dtype=np.int64)
            gene_token = toks[:, 0]
        elif self.anchor is not None and m == 2:
            which = np.where(toks[:, 0] == self.anchor, 1, 0)
            gene_token = toks[np.arange(V), which]
        else:
            which = np.zeros(V, dtype=np.int64)
            gene_token = np.full(V, -1, dtype=np.int64)
        pos = block.perturbed[np.arange(V), which]
        # an inserted gene (source position past the cell) had no rank
        orig = np.where(pos < len(plan.input_ids), np.searchsorted(gene_slots, pos), -1)
        newp = block.new_pos[np.arange(V), which]
        if self.perturbation == "delete":
            new_rank = np.full(V, -1, dtype=np.int64)
        else:
            new_rank = np.searchsorted(gene_slots, newp)
        ens = self.ensembl_of or {}
        c = self.cols
        c.setdefault("cell_index", []).append(np.full(V, plan.cell_index, dtype=np.int64))
        c.setdefault("gene_token", []).append(gene_token.astype(np.int64))
        c.setdefault("gene_tokens", []).extend(list(r) for r in toks.astype(np.int64))
        c.setdefault("ensembl_id", []).extend(
            "+".join(ens.get(int(t), str(int(t))) for t in r) if all(int(t) in ens for t in r) else None
            for r in toks)
        sym = self.symbol_of or {}
        c.setdefault("gene_name", []).extend(
            "+".join(sym.get(int(t)) or ens.get(int(t)) or str(int(t)) for t in r) for r in toks)
        c.setdefault("n_genes", []).append(np.full(V, n_genes, dtype=np.int64))
        c.setdefault("orig_rank", []).append(orig.astype(np.int64))
        c.setdefault("new_rank", []).append(new_rank.astype(np.int64))
        c.setdefault("cos_sim", []).append(np.asarray(res.cos_sim, dtype=np.float64))
        if self.target_columns:
            ts = np.asarray(res.target_shift, dtype=np.float64).reshape(V, len(self.target_columns))
            for j, name in enumerate(self.target_columns):
                c.setdefault(name, []).append(ts[:, j])
        if res.gene_tokens is not None:
            c.setdefault("gene_shift_tokens", []).extend(res.gene_tokens)
            c.setdefault("gene_shift_cos", []).extend(res.gene_cos)

    def frame(self, **attrs) -> pd.DataFrame:
        c = self.cols
        n = sum(len(a) for a in c.get("cell_index", []))
        out: dict[str, object] = {}

        def scalar(k: str, dt: type) -> np.ndarray:
            arrs = c.get(k, [])
            return np.concatenate(arrs).astype(dt) if arrs else np.zeros(0, dtype=dt)

        for k in ("cell_index", "perturbation", "gene_token", "gene_tokens", "ensembl_id", "gene_name",
                  "n_genes", "orig_rank", "new_rank", "cos_sim", "shift"):
            if k == "perturbation":
                out[k] = pd.Series([self.perturbation] * n, dtype=object)
            elif k == "shift":
                out[k] = 1.0 - out["cos_sim"]
            elif k in ("gene_tokens", "ensembl_id", "gene_name"):
                out[k] = pd.Series(c.get(k, []), dtype=object)
            else:
                out[k] = scalar(k, np.float64 if k == "cos_sim" else np.int64)
        for k in self.target_columns:
            out[k] = scalar(k, np.float64)
        if self.with_gene_shifts:
            for k in ("gene_shift_tokens", "gene_shift_cos"):
                out[k] = pd.Series(c.get(k, []), dtype=object)
        df = pd.DataFrame(out)
        df.attrs.update(attrs)
        df.attrs["skipped"] = list(self.skipped)
        return df


def to_numpy_list(rows: list) -> list[np.ndarray]:
    return [np.asarray(r) for r in rows]
