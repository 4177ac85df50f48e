"""Token store: sharded Parquet + packed memory-mapped tokens + manifest."""

from .cells import CellSource, open_cells
from .reader import TokenStore, read_manifest, read_table, to_hf_dataset
from .writer import ShardedTokenWriter

__all__ = ["CellSource", "open_cells", "TokenStore", "read_manifest", "read_table", "to_hf_dataset", "ShardedTokenWriter"]
