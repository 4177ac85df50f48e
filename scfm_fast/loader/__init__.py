"""Loader: varlen packing and token-budget batching."""

from .collate import PackedBatch, pack_cells
from .sampler import assign_to_ranks, megabatch_batches, token_budget_batches

__all__ = ["PackedBatch", "assign_to_ranks", "megabatch_batches", "pack_cells", "token_budget_batches"]
