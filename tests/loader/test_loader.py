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


def test_megabatch_batches_sort_within_windows_only():
    from scfm_fast.loader import megabatch_batches

    lengths = np.array([1, 9, 2, 8, 30, 3, 4, 20])
    batches = megabatch_batches(lengths, max_tokens=12, megabatch=4)
    assert sorted(np.concatenate(batches).tolist()) == list(range(8))
    assert all(set(b.tolist()) <= {0, 1, 2, 3} or set(b.tolist()) <= {4, 5, 6, 7} for b in batches)
    assert [b.tolist() for b in batches[:2]] == [[1], [3, 2, 0]]  # longest first, greedy under 12 tokens
    for b in batches:
        assert lengths[b].sum() <= 12 or len(b) == 1


def test_assign_to_ranks_balances_tokens_and_respects_capacity():
    from scfm_fast.loader import assign_to_ranks

    out = assign_to_ranks(np.array([10, 9, 8, 1, 1, 1]), world_size=2, per_rank=3)
    assert sorted(sum(out, [])) == list(range(6)) and all(len(x) == 3 for x in out)
    loads = [sum([10, 9, 8, 1, 1, 1][i] for i in x) for x in out]
    assert max(loads) - min(loads) <= 8  # 10+1+1 / 9+8+1 (capacity forces it), not 10+9+8
    assert assign_to_ranks(np.array([5]), world_size=2, per_rank=1) == [[0], []]
    with pytest.raises(ValueError, match="do not fit"):
        assign_to_ranks(np.ones(5), world_size=2, per_rank=2)
