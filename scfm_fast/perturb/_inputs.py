"""A screen's cells, checked against the model, read part by part from one :class:`~scfm_fast.store.cells.CellSource`.

Cells come only through :func:`~scfm_fast.store.cells.open_cells` (token dataset directory, Parquet token
table, ``pyarrow.Table`` or a list of arrays); the tokenizer config (special tokens, orthologs, dictionary
hash) is the source's. Tokens are read :data:`PART_CELLS` cells at a time, so a screen's memory is
bounded by that part (the CLI's ``--cells-per-shard``), never by the corpus.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .._errors import InputFileError, UsageError
from ..store.cells import CellSource
from ..vocab.targets import TargetResolver

#: cells whose tokens are held at once while a source is checked or planned
PART_CELLS = 1024


def special_ids(explicit: Iterable[int] | None, src: CellSource, resolver: TargetResolver) -> list[int]:
    """Explicit special ids, else the source's recorded ones, else the token dictionary's."""
    if explicit is not None:
        return sorted({int(i) for i in explicit})
    # the dataset's record wins over the (default: bundled V1) dictionary, which lacks V2's <cls>/<eos>
    own = src.special_token_ids
    return list(own) if own is not None else resolver.special_token_ids()


def default_pooling(src: CellSource, special: Iterable[int]) -> str:
    """``"cls"`` for a V2 source (its config records a ``<cls>`` token among the specials), else ``"mean"``."""
    cls = src.special_tokens.get("<cls>")
    return "cls" if cls is not None and int(cls) in {int(t) for t in special} else "mean"


def iter_positions(src: CellSource, *, pad: int | None,
                   part_cells: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(position in src, input_ids without padding)``, tokens read ``part_cells`` (default
    :data:`PART_CELLS`) cells at a time."""
    start = 0
    for part in src.parts(part_cells or PART_CELLS):
        for k, ids in enumerate(part.take(np.arange(len(part)))):
            yield start + k, (ids if pad is None else ids[ids != pad])
        start += len(part)


def check_cells(src: CellSource, model: Any, *, pooling: str, special: Iterable[int],
                count_genes: bool) -> int | None:
    """Refuse cells the model cannot read, before any is perturbed; returns the number of delete-all
    variants when ``count_genes`` (for the progress bar), else ``None``.

    Raises
    ------
    InputFileError
        Token ids outside the model's vocabulary, or cells longer than its positions.
    UsageError
        ``pooling="cls"`` with cells that do not start with a special token.
    """
    from ..embed.genecompass import is_genecompass

    species_row = is_genecompass(model)  # GeneCompass's cls readout: its species row, not a <cls> token
    vocab = model.config.vocab_size
    bad = src.first_token_outside(vocab)
    if bad is not None:  # would be an IndexError deep in the embedding
        pos, tok = bad
        msg = (f"{src.name}: cell {int(src.cell_index[pos])} (and maybe others) holds token id {tok}, outside the "
               f"model's vocabulary of {vocab}: these tokens come from another dictionary than this model's; "
               "re-tokenize with the model's --token-dictionary or pass the matching --model")
        raise InputFileError(msg)
    max_pos, pad = model.config.max_position_embeddings, model.config.pad_token_id
    spec = np.asarray(sorted({int(t) for t in special}), dtype=np.int64)
    long_cells, no_cls, total = [], [], 0
    maybe_long = bool((src.lengths > max_pos).any())  # padding does not count: recheck those cells only
    for pos, ids in iter_positions(src, pad=pad):
        if maybe_long and len(ids) > max_pos:
            long_cells.append(pos)
        if pooling == "cls" and not species_row and (len(ids) == 0 or ids[0] not in spec):
            no_cls.append(pos)
        if count_genes:
            n = int((~np.isin(ids, spec)).sum())
            total += n if n > 1 else 0  # a one-gene cell is skipped (see plan_cell)
    cell = src.cell_index
    if long_cells:
        msg = (f"{src.name}: {len(long_cells):,} cells (cell_index {cell[long_cells[:10]].tolist()}) are longer than the "
               f"model's {max_pos} positions: re-tokenize with `scfm tokenize ... --max-len {max_pos}` or use a "
               "model with more positions")
        raise InputFileError(msg)
    if no_cls:
        msg = (f"pooling='cls' needs cells that start with a <cls> token (a special token id); cells "
               f"{cell[no_cls[:10]].tolist()} do not: use pooling='mean' for V1 token layouts")
        raise UsageError(msg)
    return total if count_genes else None


def to_cell_index(df: Any, src: CellSource, *, with_file_index: bool) -> list[dict]:
    """Replace the positions in ``df["cell_index"]`` and its skip records by the cells' ``cell_index``
    (and add ``file_index``: ``cell_index`` repeats across input files); returns the mapped skips."""
    cell = np.asarray(src.cell_index, dtype=np.int64)
    files = np.asarray(src.file_index, dtype=np.int32) if with_file_index else None
    pos = df["cell_index"].to_numpy()
    df["cell_index"] = cell[pos] if len(pos) else pos
    if files is not None:
        df.insert(1, "file_index", files[pos] if len(pos) else pos.astype(np.int32))
    skipped = []
    for rec in df.attrs.get("skipped", []):
        i = int(rec.get("cell_index", -1))
        rec = dict(rec)
        if i >= 0:  # -1: not about one cell (e.g. a gene outside the vocabulary)
            rec["cell_index"] = int(cell[i])
            if files is not None:
                rec["file_index"] = int(files[i])
        skipped.append(rec)
    df.attrs["skipped"] = skipped
    return skipped
