"""Unpad / pad helpers for variable-length batches (flash-attn's ``cu_seqlens`` contract).

A batch of ``B`` cells of lengths ``l_i`` is packed as ``total = sum(l_i)`` rows; ``cu_seqlens`` is
``int32 (B+1,)`` with ``cu_seqlens[0] = 0`` and ``cu_seqlens[i+1] - cu_seqlens[i] = l_i``.
Reference: the padded layout ``(B, max_seqlen, ...)`` with a boolean mask; ``pad(unpad(x)) == x`` on
real positions. Gather/scatter with integer indices are differentiable in PyTorch already, so these
are thin functions rather than custom autograd Functions.
"""

from __future__ import annotations

import torch


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """``int32`` cumulative lengths with a leading zero."""
    lengths = torch.as_tensor(lengths)
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    out[1:] = torch.cumsum(lengths.to(torch.int64), 0).to(torch.int32)
    return out


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Position of each packed row inside its own sequence (0, 1, ..., l_i - 1 per cell)."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    total = int(cu[-1]) if total is None else total
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total)
    return torch.arange(total, device=cu.device) - starts


def seq_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Index of the sequence each packed row belongs to."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    total = int(cu[-1]) if total is None else total
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)


def unpad_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat indices of real positions of a ``(B, L)`` mask, ``cu_seqlens`` and ``max_seqlen``.

    Real positions must be a prefix of each row (right padding), as in HF BERT inputs.
    """
    lengths = mask.sum(-1, dtype=torch.int32)
    idx = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    return idx, cu_seqlens_from_lengths(lengths), int(lengths.max()) if lengths.numel() else 0


def unpad(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(B, L, ...) -> (total, ...)``; returns (packed, indices, cu_seqlens, max_seqlen)."""
    idx, cu, max_len = unpad_indices(mask)
    return x.flatten(0, 1).index_select(0, idx), idx, cu, max_len


def pad(x: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """``(total, ...) -> (B, L, ...)`` with zeros at padded positions (inverse of :func:`unpad`)."""
    out = x.new_zeros((batch * seqlen, *x.shape[1:]))
    out = out.index_copy(0, indices, x)
    return out.view(batch, seqlen, *x.shape[1:])


def pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``(total, ...)`` -> padded ``(B, max_seqlen, ...)`` and the boolean mask."""
    batch = cu_seqlens.numel() - 1
    total = x.shape[0]
    pos = position_ids_from_cu_seqlens(cu_seqlens, total)
    seq = seq_ids_from_cu_seqlens(cu_seqlens, total)
    flat = seq * max_seqlen + pos
    out = pad(x, flat, batch, max_seqlen)
    mask = torch.zeros(batch * max_seqlen, dtype=torch.bool, device=x.device)
    mask[flat] = True
    return out, mask.view(batch, max_seqlen)
