"""Varlen packing and token-budget batching."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast.loader import pack_cells, token_budget_batches


def test_pack_cells_layout():
    b = pack_cells([np.array([5, 6, 7]), np.array([9]), np.array([2, 3])], index=np.array([10, 11, 12]))
    assert b.input_ids.tolist() == [5, 6, 7, 9, 2, 3]
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6] and str(b.cu_seqlens.dtype) == "torch.int32"
    assert b.max_seqlen == 3 and b.position_ids.tolist() == [0, 1, 2, 0, 0, 1]
    assert b.index.tolist() == [10, 11, 12]
    with pytest.raises(ValueError, match="no tokens"):
        pack_cells([np.array([1]), np.array([], dtype=np.int64)])


def test_token_budget_batches_cover_every_cell_once():
    lengths = np.array([5, 100, 3, 50, 50, 1, 7])
    batches = token_budget_batches(lengths, max_tokens=60)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(7))
    for b in batches:
        assert lengths[b].sum() <= 60 or len(b) == 1
    shards = [token_budget_batches(lengths, max_tokens=60, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(np.concatenate([np.concatenate(s) for s in shards]).tolist()) == list(range(7))
    assert all(len(b) <= 2 for b in token_budget_batches(lengths, max_tokens=1000, max_cells=2))
