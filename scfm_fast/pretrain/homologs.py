"""The mouse -> human homolog remap of a GeneCompass model trained from scratch (``--homologs FILE``).

GeneCompass looks up a mouse cell's prior knowledge through its genes' human homologs: the model's
``homologous_index`` maps each mouse token to a human token (every other token to itself). Its loader
reads ``homologous_hm_token.pickle``, a dict **human token -> mouse token** over its own token dictionary,
inverts it, and writes ``index[mouse] = human``; when several human tokens name one mouse token, the last
one in the pickle's order wins (a dict inversion). This module builds the same index from:

- that pickle (int -> int, token ids of the token dictionary the data were tokenized with), or a pickle
  of gene ids (str -> str, human id -> mouse id);
- a two-column TSV: human gene id, mouse gene id (``#`` comments allowed; rows naming a gene outside the
  token dictionary, a header row included, are skipped), with the same last-wins rule in row order.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from .._errors import InputFileError
from ..vocab.dictionaries import load_pickle_dict
from .knowledge import species_of

log = logging.getLogger("scfm_fast")

_SPECIALS = ("<pad>", "<mask>")


def homologous_index(path: str | Path, token_of: Mapping[str, int], *, vocab_size: int) -> np.ndarray:
    """GeneCompass's ``homologous_index`` (``[vocab_size]`` int64) from a homolog pickle or TSV.

    Parameters
    ----------
    path
        GeneCompass's homolog pickle (human token -> mouse token), a pickle of human gene id -> mouse gene
        id, or a two-column TSV (human gene id, mouse gene id); optionally gzipped.
    token_of
        The token dictionary (gene id -> token) the training data were tokenized with.
    vocab_size
        The model's vocabulary size.

    Raises
    ------
    InputFileError
        The file cannot be read; a token lies outside the dictionary or is ``<pad>``/``<mask>``; a pair is
        stored the wrong way round (mouse id first); or no pair names two genes of the dictionary.
    """
    p = Path(path)
    pairs = list(_token_pairs(p, token_of, vocab_size))
    if not pairs:
        msg = (f"{p}: none of its homolog pairs names a human and a mouse gene of the token dictionary; give "
               "human gene id -> mouse gene id (ENSG..., ENSMUSG...) pairs keyed like --token-dictionary")
        raise InputFileError(msg)
    index = np.arange(vocab_size, dtype=np.int64)
    seen: dict[int, int] = {}
    for human, mouse in pairs:  # in file order: the last pair naming a mouse token wins, as in GeneCompass
        index[mouse] = human
        seen[mouse] = seen.get(mouse, 0) + 1
    several = sum(n > 1 for n in seen.values())
    if several:
        log.warning("%s: %d mouse genes have several human homologs; each takes the last one listed "
                    "(GeneCompass's rule)", p, several)
    log.info("%s: %d mouse tokens remapped to human homologs", p, len(seen))
    return index


def _token_pairs(p: Path, token_of: Mapping[str, int], vocab_size: int) -> Iterator[tuple[int, int]]:
    """(human token, mouse token) pairs in file order."""
    try:
        with open(p, "rb") as f:
            head = f.read(2)
    except OSError as e:
        msg = f"{p}: cannot read the homolog table ({e}); pass GeneCompass's homolog pickle or a human/mouse id TSV"
        raise InputFileError(msg) from e
    if head[:1] == b"\x80":  # a pickle (protocol >= 2)
        d = load_pickle_dict(p, what="homolog pickle")
        if all(_is_int(k) and _is_int(v) for k, v in d.items()):
            yield from _checked_tokens(p, d, token_of, vocab_size)
        elif all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
            yield from _gene_pairs(((f"entry {k!r}", k, v) for k, v in d.items()), token_of, p)
        else:
            k, v = next((k, v) for k, v in d.items() if not (_is_int(k) and _is_int(v)))
            msg = (f"{p}: entry {k!r} -> {v!r}: a homolog pickle maps human token -> mouse token (ints, as "
                   "GeneCompass's homologous_hm_token.pickle) or human gene id -> mouse gene id (strings)")
            raise InputFileError(msg)
    else:
        yield from _gene_pairs(_tsv_rows(p, gz=head == b"\x1f\x8b"), token_of, p)


def _is_int(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _checked_tokens(p: Path, d: Mapping, token_of: Mapping[str, int],
                    vocab_size: int) -> Iterator[tuple[int, int]]:
    gene_of = {int(t): g for g, t in token_of.items()}
    for h, m in d.items():
        h, m = int(h), int(m)
        where = f"{p}: human token {h} -> mouse token {m}"
        bad = next((t for t in (h, m) if not 0 <= t < vocab_size), None)
        if bad is not None:
            msg = (f"{where}: token {bad} is outside the token dictionary (0..{vocab_size - 1}); the pickle was "
                   "made for another token dictionary: give a TSV of human/mouse gene ids instead")
            raise InputFileError(msg)
        hg, mg = gene_of.get(h, ""), gene_of.get(m, "")
        if hg in _SPECIALS or mg in _SPECIALS:
            msg = f"{where}: names {hg if hg in _SPECIALS else mg}, not a gene"
            raise InputFileError(msg)
        if species_of(hg) == "mouse" or species_of(mg) == "human":
            msg = (f"{where}: that is {hg} -> {mg}; the pickle must map human token -> mouse token (as "
                   "GeneCompass's homologous_hm_token.pickle) over the token dictionary the data were tokenized with")
            raise InputFileError(msg)
        yield h, m


def _tsv_rows(p: Path, *, gz: bool) -> Iterator[tuple[str, str, str]]:
    try:
        with (gzip.open(p, "rt", encoding="utf-8") if gz else open(p, encoding="utf-8")) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                cols = [c.strip() for c in line.split("\t")]
                if len(cols) != 2:
                    msg = (f"{p}, line {n}: expected 2 tab-separated columns (human gene id, mouse gene id), got "
                           f"{len(cols)}: {line[:80]!r}")
                    raise InputFileError(msg)
                yield f"line {n}", cols[0], cols[1]
    except (OSError, UnicodeDecodeError, EOFError) as e:
        msg = f"{p}: cannot read the homolog TSV ({type(e).__name__}: {e})"
        raise InputFileError(msg) from e


def _gene_pairs(rows, token_of: Mapping[str, int], p: Path) -> Iterator[tuple[int, int]]:
    """Token pairs of (where, human id, mouse id) rows; rows naming a gene outside the dictionary are skipped."""
    skipped = 0
    for where, human, mouse in rows:
        if species_of(human) == "mouse" or species_of(mouse) == "human":
            msg = (f"{p}, {where}: {human!r} -> {mouse!r}; the first column must be the human gene id (ENSG...) "
                   "and the second the mouse one (ENSMUSG...)")
            raise InputFileError(msg)
        if human in token_of and mouse in token_of and human not in _SPECIALS and mouse not in _SPECIALS:
            yield int(token_of[human]), int(token_of[mouse])
        else:
            skipped += 1
    if skipped:
        log.info("%s: %d homolog pairs skipped (a gene outside the token dictionary)", p, skipped)
