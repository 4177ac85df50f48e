"""Pack cells into unpadded (varlen) batches: flash-attn's contract.

A batch is ``input_ids (total,)``, ``cu_seqlens int32 (B+1,)``, ``max_seqlen: int`` and
``position_ids (total,)``; no padding token is ever materialised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PackedBatch:
    """One unpadded batch of cells."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    position_ids: torch.Tensor
    index: np.ndarray  # which cells (positions in the caller's list) are in the batch, in order

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device, non_blocking=True), self.cu_seqlens.to(device, non_blocking=True),
                           self.max_seqlen, self.position_ids.to(device, non_blocking=True), self.index)


def pack_cells(cells: Sequence[np.ndarray], index: np.ndarray | None = None) -> PackedBatch:
    """Concatenate token arrays into a :class:`PackedBatch`.

    Parameters
    ----------
    cells
        Token id arrays, one per cell (length >= 1).
    index
        Labels carried along (default ``arange(len(cells))``).
    """
    lengths = np.fromiter((len(c) for c in cells), dtype=np.int64, count=len(cells))
    if (lengths == 0).any():
        msg = "pack_cells: a cell has no tokens; drop empty cells before batching"
        raise ValueError(msg)
    cu = np.zeros(len(cells) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    ids = np.concatenate([np.asarray(c, dtype=np.int64) for c in cells]) if cells else np.zeros(0, np.int64)
    pos = np.arange(ids.size, dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), lengths)
    return PackedBatch(torch.from_numpy(ids), torch.from_numpy(cu), int(lengths.max(initial=0)),
                       torch.from_numpy(pos), np.arange(len(cells)) if index is None else np.asarray(index))
