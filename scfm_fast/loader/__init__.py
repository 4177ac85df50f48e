"""Loader: varlen packing and token-budget batching."""

from .collate import PackedBatch, pack_cells
from .sampler import token_budget_batches

__all__ = ["PackedBatch", "pack_cells", "token_budget_batches"]
