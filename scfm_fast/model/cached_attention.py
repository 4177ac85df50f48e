"""Attention over a cached key/value set, updated by softmax bookkeeping (the approx perturbation engine).

A row's attention output is ``o = sum_j e^{s_j} v_j / sum_j e^{s_j}`` with ``s_j = q.k_j * scale``. Kept
with its log-normaliser ``lse = log sum_j e^{s_j}``, the output for the same query over a changed key set
(keys ``R`` removed, keys ``N`` added) follows without touching the other keys::

    o' = (e^{lse} o - sum_{j in R} e^{s_j} v_j + sum_{j in N} e^{s_j} v_j)
         / (e^{lse} - sum_{j in R} e^{s_j} + sum_{j in N} e^{s_j})

``O(|R| + |N|)`` per row instead of ``O(L)``. All three functions compute in float64: where a removed key
held most of a row's mass the denominator is close to 0, and float32 rounding of ``o`` would be amplified
by its inverse (measured: 1.6e-5 on a deletion that the update makes exact). Shapes are
``(..., heads, rows, head_dim)``; the references are the plain softmax attention of the changed key set
(tests/model/test_cached_attention.py).
"""

from __future__ import annotations

import torch


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention output and log-normaliser ``(o, lse)`` in float64 (``lse``: ``(..., rows)``)."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


def update_attention(q: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, k_rm: torch.Tensor,
                     v_rm: torch.Tensor, *, scale: float, k_new: torch.Tensor | None = None,
                     v_new: torch.Tensor | None = None) -> torch.Tensor:
    """Output of queries ``q`` (cached ``o``, ``lse``) once keys ``k_rm``/``v_rm`` are removed and, when
    given, ``k_new``/``v_new`` added (module docstring). float64; the denominator is clamped at
    ``1e-6`` of the cached normaliser (a row that kept nothing of its mass)."""
    q, lse = q.double(), lse[..., None]
    s_old = (q @ k_rm.double().transpose(-1, -2)) * scale
    if k_new is None:
        m, base = lse, torch.ones_like(lse)
        a_old = torch.exp(s_old - m)
        num = o - a_old @ v_rm.double()
        den = base - a_old.sum(-1, keepdim=True)
    else:
        s_new = (q @ k_new.double().transpose(-1, -2)) * scale
        m = torch.maximum(lse, s_new.amax(-1, keepdim=True))
        base = torch.exp(lse - m)
        a_old, w_new = torch.exp(s_old - m), torch.exp(s_new - m)
        num = base * o - a_old @ v_rm.double() + w_new @ v_new.double()
        den = base - a_old.sum(-1, keepdim=True) + w_new.sum(-1, keepdim=True)
    return num / torch.maximum(den, 1e-6 * base)


def attention_over_two_sets(q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, drop1: torch.Tensor,
                            k2: torch.Tensor, v2: torch.Tensor, *, scale: float) -> torch.Tensor:
    """float64 softmax attention of ``q`` over the union of two key sets: ``k1``/``v1`` (shared, e.g. a
    cache; keys where the boolean ``drop1`` is true left out) and ``k2``/``v2`` (per batch row)."""
    s1 = ((q.double() @ k1.double().transpose(-1, -2)) * scale).masked_fill(drop1, float("-inf"))
    s2 = (q.double() @ k2.double().transpose(-1, -2)) * scale
    a = torch.softmax(torch.cat([s1, s2], -1), -1)
    n1 = s1.shape[-1]
    return a[..., :n1] @ v1.double() + a[..., n1:] @ v2.double()
