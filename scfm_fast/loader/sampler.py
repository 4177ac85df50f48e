"""Length-sorted, token-budget batching (and rank sharding) for unpadded batches."""

from __future__ import annotations

import numpy as np


def token_budget_batches(lengths: np.ndarray, *, max_tokens: int, max_cells: int | None = None,
                         sort: bool = True, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """Group cell indices into batches of at most ``max_tokens`` tokens.

    Parameters
    ----------
    lengths
        Tokens per cell.
    max_tokens
        Token budget per batch (a single longer cell gets a batch of its own).
    max_cells
        Optional cap on cells per batch.
    sort
        Sort by length (longest first) so that cells of similar length share a batch: with varlen
        attention this does not change results, only speed.
    rank, world_size
        Keep every ``world_size``-th batch starting at ``rank`` (disjoint shards for torchrun).

    Returns
    -------
    list of int arrays (indices into ``lengths``).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_tokens < 1:
        msg = f"max_tokens must be >= 1, got {max_tokens}"
        raise ValueError(msg)
    order = np.argsort(-lengths, kind="stable") if sort else np.arange(lengths.size)
    batches: list[np.ndarray] = []
    cur: list[int] = []
    used = 0
    for i in order:
        n = int(lengths[i])
        if cur and (used + n > max_tokens or (max_cells is not None and len(cur) >= max_cells)):
            batches.append(np.array(cur, dtype=np.int64))
            cur, used = [], 0
        cur.append(int(i))
        used += n
    if cur:
        batches.append(np.array(cur, dtype=np.int64))
    return batches[rank::world_size]
