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


def megabatch_batches(lengths: np.ndarray, *, max_tokens: int, megabatch: int,
                      max_cells: int | None = None) -> list[np.ndarray]:
    """Token-budget batches over cells in their given (shuffled) order, length-sorted per megabatch.

    The order is cut into consecutive megabatches of ``megabatch`` cells; each is sorted by length and
    packed greedily with :func:`token_budget_batches`. Sorting only inside a megabatch keeps the
    epoch's randomness while cells of similar length share a batch.

    Parameters
    ----------
    lengths
        Tokens per cell, in the order the cells should be drawn.
    max_tokens, max_cells
        As in :func:`token_budget_batches`.
    megabatch
        Cells per sorting window (>= 1).

    Returns
    -------
    list of int arrays (positions into ``lengths``); every position exactly once.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    out: list[np.ndarray] = []
    for lo in range(0, lengths.size, max(1, megabatch)):
        part = lengths[lo:lo + max(1, megabatch)]
        out.extend(b + lo for b in token_budget_batches(part, max_tokens=max_tokens, max_cells=max_cells))
    return out


def assign_to_ranks(batch_tokens: np.ndarray, *, world_size: int, per_rank: int) -> list[list[int]]:
    """Deal one step's micro-batches to ranks so that each rank's token total is balanced.

    Longest-processing-time greedy: the batch with most tokens goes to the rank with fewest tokens
    that still has room (each rank takes at most ``per_rank`` batches).

    Parameters
    ----------
    batch_tokens
        Tokens of each micro-batch of the step (at most ``world_size * per_rank``).
    world_size, per_rank
        Ranks and micro-batches (gradient-accumulation steps) per rank.

    Returns
    -------
    For each rank, the positions (into ``batch_tokens``) of its micro-batches, in ascending order.
    """
    toks = np.asarray(batch_tokens, dtype=np.int64)
    if toks.size > world_size * per_rank:
        msg = f"{toks.size} micro-batches do not fit {world_size} ranks x {per_rank}"
        raise ValueError(msg)
    load = np.zeros(world_size, dtype=np.int64)
    out: list[list[int]] = [[] for _ in range(world_size)]
    for b in np.argsort(-toks, kind="stable"):
        room = [r for r in range(world_size) if len(out[r]) < per_rank]
        r = min(room, key=lambda x: (load[x], x))
        out[r].append(int(b))
        load[r] += toks[b]
    return [sorted(x) for x in out]
