"""Chunks tokenized in pieces: a chunk (one output shard) is read and ranked a few thousand cells at a time.

Why: with whole chunks, a 20,000-cell input is two chunks and the three stages (read, rank, write) can
hardly overlap (the first read and the last write run alone); and every stage holds a whole chunk's
counts, so a long run, where all stages are busy at once, peaked ~25-35% above a short one. In pieces,
ranking starts after the first piece is read, and only the pieces in flight hold counts. Each piece is
tokenized by :func:`~scfm_fast.tokenizer.pipeline.tokenize_chunk`; a chunk's shard is the concatenation
of its pieces' tables, so the tokens equal those of a whole-chunk call cell for cell.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ..readers.base import CellChunk

#: Cells per piece in one process (~4.7 M stored counts at ~1,900 non-zeros per cell: 38 MiB of int32 +
#: float32), where reading, ranking and writing overlap piece by piece.
PIECE_CELLS = 2_500
#: Cells per piece in a worker process whose reader ``decodes_chunks`` (Zarr, gzip / lzf h5ad): a worker
#: reads, ranks and writes its chunks one after another, so it gains nothing from overlap inside a chunk,
#: while every piece boundary decodes a partly read storage chunk (twice: the next chunk usually goes to
#: another worker) and costs a core call and its Python. Paired A/Bs, whole 10,000-cell chunks against
#: 2,500-cell pieces: CPU 0.85-0.94x on Zarr v2 and v3 and 0.77x on gzip h5ad, for +15 MiB peak RSS per
#: worker; uncompressed h5ad (memory-mapped, nothing decoded) measured 1.02-1.06x, so it keeps small
#: pieces. Larger chunks (``--chunk-size``) are still read in pieces of this size: memory stays bounded.
WORKER_PIECE_CELLS = 10_000


def piece_size(chunk_size: int, *, whole: bool = False) -> int:
    """Cells per piece for chunks of ``chunk_size`` cells; ``whole``: in a worker, from a reader that decodes
    storage chunks (see :data:`WORKER_PIECE_CELLS`)."""
    return min(chunk_size, WORKER_PIECE_CELLS if whole else PIECE_CELLS)


def split_piece(c: CellChunk, n: int) -> tuple[CellChunk, CellChunk]:
    """The first ``n`` cells of ``c`` and the rest (counts are views, not copies)."""
    a, meta = int(c.indptr[n]), c.meta
    head = CellChunk(c.start, c.indptr[: n + 1], c.indices[:a], c.data[:a], meta.slice(0, n))
    tail = CellChunk(c.start + n, c.indptr[n:] - a, c.indices[a:], c.data[a:], meta.slice(n, len(meta)))
    return head, tail


def chunk_pieces(pieces: Iterator[CellChunk], *, chunk_size: int, n_obs: int) -> Iterator[tuple[CellChunk, bool]]:
    """Cut a stream of consecutive pieces at chunk boundaries (multiples of ``chunk_size``).

    Yields ``(piece, last)``: ``last`` when the piece ends its chunk (or the file).
    """
    for p in pieces:
        while True:
            end = min(n_obs, (p.start // chunk_size + 1) * chunk_size)
            if p.stop <= end:
                yield p, p.stop == end
                break
            head, p = split_piece(p, end - p.start)
            yield head, True


@dataclass
class ChunkParts:
    """The tokenized pieces of one chunk, joined into its shard table and manifest statistics."""

    tables: list[pa.Table] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def add(self, table: pa.Table, stats: dict[str, Any]) -> None:
        self.tables.append(table)
        for k, v in stats.items():
            self.stats[k] = self.stats.get(k, 0) + v

    def join(self) -> tuple[pa.Table, dict[str, Any]]:
        """The chunk's table (pieces in order) and summed statistics; the parts are released."""
        table = self.tables[0] if len(self.tables) == 1 else pa.concat_tables(self.tables)
        stats, self.tables, self.stats = self.stats, [], {}
        return table, stats


def tokenize_pieces(pieces: Iterator[tuple[CellChunk, bool]], tokenize) -> Iterator[tuple[int, int, pa.Table,
                                                                                          dict[str, Any]]]:
    """Tokenize pieces as they come (``tokenize(piece) -> (table, stats)``); yield each finished chunk
    as ``(start, stop, table, stats)``."""
    parts, start = ChunkParts(), None
    for piece, last in pieces:
        start = piece.start if start is None else start
        parts.add(*tokenize(piece))
        stop = piece.stop
        del piece  # its counts are not needed any more: do not hold them while the caller waits
        if last:
            table, stats = parts.join()
            yield start, stop, table, stats
            start = None
