"""Geneformer's perturbation readouts, written plainly on ``transformers`` (the independent oracle).

Nothing here imports ``scfm_fast``: the perturbed sequences follow the rules of ``shared/README.md``
(delete, overexpress to the front in list order, quartile moves, absent genes not handled) and every
sequence runs alone through one plain Hugging Face ``BertForMaskedLM.bert`` forward with
``output_hidden_states=True``. The fidelity tests compare our engines against these numbers.
"""

from __future__ import annotations

import numpy as np
import torch

# Geneformer V1's 6-layer checkpoint shape (shared/geneformer_v1/config_6L_30M.json), weights random
V1_CONFIG = dict(vocab_size=25426, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                 intermediate_size=512, hidden_act="relu", max_position_embeddings=2048, type_vocab_size=2,
                 layer_norm_eps=1e-12, pad_token_id=0, attention_probs_dropout_prob=0.02,
                 hidden_dropout_prob=0.02)


def random_v1_model(seed: int = 0, *, std: float = 0.25, extra_tokens: int = 0):
    """A random-init Geneformer-V1-shaped ``BertForMaskedLM`` (eval mode).

    ``std`` above BERT's 0.02 makes perturbation effects visible (with 0.02 every cosine is ~1 - 1e-7,
    and any readout would pass a 1e-5 comparison). ``extra_tokens`` appends ids (e.g. ``<cls>``/``<eos>``
    for a V2 layout test).
    """
    from transformers import BertConfig, BertForMaskedLM

    cfg = dict(V1_CONFIG, vocab_size=V1_CONFIG["vocab_size"] + extra_tokens, initializer_range=std)
    torch.manual_seed(seed)
    m = BertForMaskedLM(BertConfig(**cfg)).eval()
    with torch.no_grad():  # LayerNorms away from the identity, as trained ones are
        for name, p in m.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def hidden(model, ids: list[int], layer: int) -> torch.Tensor:
    """``hidden_states[layer]`` of one plain forward of one cell (float64 copy)."""
    with torch.no_grad():
        out = model.bert(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         output_hidden_states=True)
    return out.hidden_states[layer][0].double()


def quartile_target(rank: int, n: int, kind: str, quartiles: int) -> int:
    """Geneformer's documented move: a gene in quartile ``b`` goes to the middle of quartile ``b -/+ k``;
    past the first quartile to the front, past the last to the bottom."""
    b = min(rank * 4 // n, 3)
    t = b - quartiles if kind == "activate" else b + quartiles
    if t < 0:
        return 0
    if t > 3:
        return n - 1
    return min((2 * t + 1) * n // 8, n - 1)


def perturbed(ids: list[int], kind: str, genes: list[int], special: set[int], *, quartiles: int = 1,
              max_len: int = 2048) -> list[int]:
    """The perturbed token sequence (``genes`` = tokens perturbed together, in the user's order; an
    overexpressed gene the cell lacks is inserted, and the cell cut to ``max_len`` keeping ``<eos>``)."""
    head = [t for t in ids[:1] if t in special]  # <cls> stays first
    tail = [t for t in ids[-1:] if t in special and len(ids) > 1]  # <eos> stays last
    body = [t for t in ids if t not in special]
    if kind == "delete":
        body = [t for t in body if t not in genes]
    elif kind == "overexpress":
        body = list(genes) + [t for t in body if t not in genes]
    else:
        (g,) = genes
        r = body.index(g)
        rest = [t for t in body if t != g]
        rest.insert(quartile_target(r, len(body), kind, quartiles), g)
        body = rest
    return head + body[:max_len - len(head) - len(tail)] + tail


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def readouts(model, ids: list[int], new: list[int], genes: list[int], special: set[int], *, layer: int = -2,
             states: np.ndarray | None = None) -> dict:
    """Geneformer's readouts of one perturbation.

    ``genes_cos``: mean over the genes present in both cells (perturbed genes excluded) of each gene's own
    cosine (original row vs perturbed row); ``pooled_cos``: cosine of the mean of those rows;
    ``cls_cos``: cosine of the first rows; ``state_shift``: per state, cos(perturbed, state) -
    cos(original, state), each cell the mean over all its gene rows.
    """
    h0, h1 = hidden(model, ids, layer), hidden(model, new, layer)
    row0 = {t: i for i, t in enumerate(ids) if t not in special}
    row1 = {t: i for i, t in enumerate(new) if t not in special}
    both = [t for t in new if t in row0 and t in row1 and t not in genes]
    per_gene = [_cos(h0[row0[t]], h1[row1[t]]) for t in both]
    out = {"genes_cos": float(np.mean(per_gene)), "gene_cos": dict(zip(both, per_gene)),
           "pooled_cos": _cos(h0[[row0[t] for t in both]].mean(0), h1[[row1[t] for t in both]].mean(0)),
           "cls_cos": _cos(h0[0], h1[0])}
    if states is not None:
        # the original trimmed by the same overflow as the perturbed cell (genes cut from its end)
        kept = [i for t, i in row0.items() if t in row1 or t in genes]
        e0, e1 = h0[kept].mean(0), h1[list(row1.values())].mean(0)
        out["state_shift"] = [_cos(e1, torch.as_tensor(s)) - _cos(e0, torch.as_tensor(s)) for s in states]
    return out


def cell_embedding(model, ids: list[int], special: set[int], *, layer: int = -2) -> np.ndarray:
    """One cell's embedding for a state: the mean of all its gene rows."""
    h = hidden(model, ids, layer)
    return h[[i for i, t in enumerate(ids) if t not in special]].mean(0).numpy()
