"""Cell and gene embeddings."""

from .cells import embed_cells, embed_tokens, iter_embeddings

__all__ = ["embed_cells", "embed_tokens", "iter_embeddings"]
