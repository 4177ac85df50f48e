"""Resolve a source's gene identifiers to token ids, with a match report.

Accepted identifiers: Ensembl ids (``ENSG00000141510``), versioned Ensembl ids
(``ENSG00000141510.17``), gene symbols (through a symbol -> Ensembl table) and, for mouse data fed to
a human vocabulary, mouse ids/symbols through a one-to-one ortholog table.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import GeneMatchError, InputFileError
from .dictionaries import GeneVocab, bundled_dir, load_pickle_dict

log = logging.getLogger("scfm_fast")

_VERSIONED = re.compile(r"^(ENS[A-Z]*G\d{6,})\.\d+$")


def strip_version(gene_id: str) -> str:
    """``ENSG00000141510.17`` -> ``ENSG00000141510``; other strings unchanged."""
    if not gene_id.startswith("ENS"):  # most ids of a symbol-indexed file: no pattern match needed
        return gene_id
    m = _VERSIONED.match(gene_id)
    return m.group(1) if m else gene_id


def load_gene_name_map(path: str | Path | None = None) -> dict[str, str]:
    """Gene symbol -> Ensembl id (default: Geneformer's bundled ``gene_name_id_dict.pkl``).

    ``path`` may also name a bundled Ensembl table: ``"ensembl-human"``, ``"ensembl-mouse"`` or
    ``"ensembl-human+mouse"`` (see :mod:`scfm_fast.vocab.ensembl`).
    """
    from .ensembl import BUNDLED_NAME_MAPS, ensembl_name_map

    if isinstance(path, str) and path in BUNDLED_NAME_MAPS:
        return ensembl_name_map(*BUNDLED_NAME_MAPS[path])
    p = Path(path) if path is not None else bundled_dir("geneformer_v1") / "gene_name_id_dict.pkl"
    if p.suffix in (".csv", ".tsv", ".gz", ".txt"):
        return _name_map_from_table(p)
    d = load_pickle_dict(p, what="gene name dictionary")
    if all(type(k) is str for k in d) and all(type(v) is str for v in d.values()):
        return d  # Geneformer's pickle: already text (a converted copy of 40,000 entries cost ~20 ms)
    return {str(k): str(v) for k, v in d.items()}


def load_gene_mapping(path: str | Path) -> dict[str, str]:
    """Geneformer's gene mapping dictionary (``gene_mapping_file``): source id -> vocabulary Ensembl id.

    Used as Geneformer's ``collapse_gene_ids`` does: each source id is upper-cased and looked up; ids
    that are absent, or map outside the vocabulary, are dropped; several ids mapping onto one gene
    have their raw counts summed (the core sums columns that share a token).
    """
    d = load_pickle_dict(path, what="gene mapping dictionary")
    return {str(k): str(v) for k, v in d.items() if v is not None}


#: header names of the symbol and the Ensembl id column in gene tables with more than two columns
_SYMBOL_HEADERS = ("gene_name", "symbol", "gene_symbol", "name", "gene name")
_ID_HEADERS = ("gene_id", "ensembl_id", "ensembl_gene_id", "gene stable id")


def _name_map_from_table(p: Path) -> dict[str, str]:
    """Symbol -> Ensembl id from a CSV/TSV: two columns in either order, or named columns."""
    import pandas as pd

    if not p.is_file():
        msg = f"{p}: gene name table not found; pass a .pkl/.csv/.tsv symbol table, 'auto' or 'none'"
        raise InputFileError(msg)
    df = pd.read_csv(p, sep="\t" if ".tsv" in p.name else ",", header=None, dtype=str)
    head = [str(h).strip().lower() for h in df.iloc[0]]
    if df.shape[1] == 2:
        # the id column is the one holding Ensembl ids; a header row, if any, maps nothing useful
        ens = df[0].str.startswith("ENS", na=False).mean() > df[1].str.startswith("ENS", na=False).mean()
        ids, names = (df[0], df[1]) if ens else (df[1], df[0])
    elif (i := next((head.index(h) for h in _ID_HEADERS if h in head), None)) is not None and (
            j := next((head.index(h) for h in _SYMBOL_HEADERS if h in head), None)) is not None:
        ids, names = df[i].iloc[1:], df[j].iloc[1:]
    else:
        msg = (f"{p}: gene name table has {df.shape[1]} columns; use two columns (symbol and Ensembl id) "
               f"or a header naming them ({_ID_HEADERS[0]!r} and {_SYMBOL_HEADERS[0]!r})")
        raise InputFileError(msg)
    ok = ids.notna() & names.notna()
    return dict(zip(names[ok], ids[ok]))


class SpeciesNameMap(dict):
    """Symbol table of one declared species, taken from the joint human + mouse table for a file whose
    species is known (``--species``): its symbols, exact or by case, resolve only to that species'
    genes (GeneCompass maps genes within their species; upper-cased mouse "TMSB4X" is mouse Tmsb4x,
    never human TMSB4X).  ``species`` tells :func:`resolve_genes` that case-only matches of a mouse
    table are mouse genes, not the sign of mouse data matched against human symbols."""

    def __init__(self, mapping: Mapping[str, str], *, species: str) -> None:
        super().__init__(mapping)
        self.species = species


def species_name_map(table: str | Path | None, species: str | None) -> SpeciesNameMap | None:
    """The one-species table replacing the joint ``ensembl-human+mouse`` table when the file's species
    is known; ``None`` for any other table or an unknown species (a per-cell species column keeps the
    joint table: a file mixing species has no one table to restrict to)."""
    from .ensembl import ensembl_name_map

    if species is None or str(table) != "ensembl-human+mouse":
        return None
    return SpeciesNameMap(ensembl_name_map(species), species=species)


def case_insensitive_map(gene_name_map: Mapping[str, str] | None, ortholog_map: Mapping[str, str] | None) -> dict | None:
    """Upper-cased symbol table for case-insensitive matches: only within one species (no ortholog table)."""
    if gene_name_map is None or ortholog_map is not None:
        return None
    key = id(gene_name_map)
    kept = _UPPER.get(key)
    if kept is None or kept[0] is not gene_name_map or kept[1] != len(gene_name_map):
        # the later of two symbols equal but for case wins, as in a dict built one entry at a time
        kept = (gene_name_map, len(gene_name_map), dict(zip([k.upper() for k in gene_name_map], gene_name_map.values())))
        _UPPER.clear()
        _UPPER[key] = kept
    return kept[2]


#: the last upper-cased symbol table, by the identity of its table (which it holds, so the id cannot be
#: reused while kept); a run resolves each input twice and every input with one table: built once (~10 ms)
_UPPER: dict[int, tuple[Mapping[str, str], int, dict[str, str]]] = {}


def match_gene_id(g: str, vocab: GeneVocab, *, gene_name_map: Mapping[str, str] | None = None,
                  ortholog_map: Mapping[str, str] | None = None,
                  upper_map: Mapping[str, str] | None = None) -> tuple[int, str]:
    """The one rule set that turns a gene identifier into a token id (cells' genes and screen targets alike).

    In order: the id itself, the id without its Ensembl version suffix, the symbol table, then either
    the ortholog table or (without one) the symbol table case-insensitively (``upper_map``) — with
    orthologs, "Actb" must go through the ortholog, never by case to human "ACTB". Only genes with a
    token *and* a median are tokenized (:meth:`GeneVocab.tokenizable`).

    Returns
    -------
    ``(token id, route)`` with route one of ``"ensembl"``, ``"version"``, ``"symbol"``, ``"ortholog"``,
    ``"case"``; ``(-1, "")`` when the gene is not tokenized.
    """
    t = vocab.tokenizable(g)
    if t >= 0:
        return t, "ensembl"
    g2 = strip_version(g)
    if g2 != g and (t := vocab.tokenizable(g2)) >= 0:
        return t, "version"
    if gene_name_map is not None and (e := gene_name_map.get(g)) is not None and (t := vocab.tokenizable(e)) >= 0:
        return t, "symbol"
    if ortholog_map is not None:
        e = ortholog_map.get(g2) or ortholog_map.get(g)
        if e is not None and (t := vocab.tokenizable(e)) >= 0:
            return t, "ortholog"
    elif upper_map is not None and (e := upper_map.get(g.upper())) is not None and (t := vocab.tokenizable(e)) >= 0:
        return t, "case"
    return -1, ""


@dataclass
class GeneMatchReport:
    """How the source's genes matched the vocabulary."""

    n_input_genes: int
    n_matched_genes: int
    n_by_ensembl: int
    n_by_version_strip: int
    n_by_symbol: int
    n_by_ortholog: int
    n_duplicate_columns: int
    unmatched_examples: list[str]
    #: symbols matched only by ignoring case ("Actb" -> ACTB): mouse genes, if most matches are of this kind
    n_case_insensitive: int = 0
    n_by_mapping: int = 0
    #: where the ids came from (``var['ensembl_id']``, ``var index``, ...), set by the caller
    id_source: str = ""

    @property
    def fraction(self) -> float:
        return self.n_matched_genes / max(self.n_input_genes, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fraction_matched"] = self.fraction
        return d

    def summary(self) -> str:
        src = f" (ids from {self.id_source})" if self.id_source else ""
        if self.n_by_mapping:
            how = f"{self.n_by_mapping:,} through the gene mapping file"
        else:
            how = (f"{self.n_by_ensembl:,} Ensembl, {self.n_by_version_strip:,} versioned, {self.n_by_symbol:,} "
                   f"symbol, {self.n_by_ortholog:,} ortholog")
        return (f"{self.n_matched_genes:,}/{self.n_input_genes:,} genes matched the vocabulary{src} "
                f"({self.fraction:.1%}: {how}; {self.n_input_genes - self.n_matched_genes:,} unmatched "
                f"dropped; {self.n_duplicate_columns:,} duplicate columns summed)")


def resolve_genes(
    gene_ids: Sequence[str] | np.ndarray,
    vocab: GeneVocab,
    *,
    gene_name_map: Mapping[str, str] | None = None,
    ortholog_map: Mapping[str, str] | None = None,
    gene_mapping: Mapping[str, str] | None = None,
    min_fraction: float = 0.2,
    source: str = "input",
    allow_case_insensitive: bool | None = None,
) -> tuple[np.ndarray, GeneMatchReport]:
    """Token id for every source gene column.

    Parameters
    ----------
    gene_ids
        The source's gene identifiers (var names or a var column).
    vocab
        The model vocabulary.
    gene_name_map
        Symbol -> Ensembl id, used for identifiers that are not Ensembl ids.
    ortholog_map
        Source-species id or symbol -> vocabulary-species Ensembl id, tried after the direct matches.
    gene_mapping
        Geneformer's gene mapping dictionary (:func:`load_gene_mapping`). When given it is the only
        route (Geneformer's semantics): ids are upper-cased and mapped, unmapped ids are dropped;
        ``gene_name_map`` and ``ortholog_map`` are then not used.
    min_fraction
        Refuse (raise :class:`GeneMatchError`) when fewer than this fraction of genes match.
    source
        Name of the input, for messages.
    allow_case_insensitive
        When most matches are symbols matched only case-insensitively (mouse-looking genes without
        an ortholog table): ``False`` refuses (:class:`GeneMatchError`), ``True`` accepts, ``None``
        accepts with a warning.

    Returns
    -------
    col_token
        ``int32`` token id per column, ``-1`` where the gene is not tokenized.
    report
        :class:`GeneMatchReport`.
    """
    if gene_mapping is not None:
        col_token, report = _resolve_mapped(gene_ids, vocab, gene_mapping)
        return col_token, _check_fraction(report, gene_ids, vocab, min_fraction=min_fraction, source=source)
    col_token, counts, case_example, unmatched = _match_all(gene_ids, vocab, gene_name_map, ortholog_map)
    n_ens, n_ver, n_orth, n_case = counts["ensembl"], counts["version"], counts["ortholog"], counts["case"]
    n_sym = counts["symbol"] + n_case
    matched = col_token[col_token >= 0]
    n_dup = int(matched.size - np.unique(matched).size)
    report = GeneMatchReport(len(gene_ids), int(matched.size), n_ens, n_ver, n_sym, n_orth, n_dup, unmatched,
                             n_case)
    if getattr(gene_name_map, "species", None) == "mouse":
        allow_case_insensitive = True  # upper-cased mouse symbols matched in the mouse table: mouse genes
    if n_case > report.n_matched_genes / 2 and allow_case_insensitive is False:
        fix = ("--species mouse if these are mouse cells" if getattr(gene_name_map, "species", None) == "human"
               else "--orthologs mouse-to-human to map mouse genes through one-to-one orthologs")
        msg = (f"{source}: {n_case:,} of {report.n_matched_genes:,} matched genes match a human symbol only "
               f"when case is ignored (e.g. {case_example!r}): this looks like mouse data. Pass {fix}, or "
               "--allow-case-insensitive if the symbols are human")
        raise GeneMatchError(msg)
    if n_case > report.n_matched_genes / 2 and allow_case_insensitive is None:
        # "Actb"-style symbols: most likely mouse genes that only match human symbols by case
        log.warning("%s: %d of %d matched genes match a symbol only case-insensitively (e.g. %r); if this "
                    "is mouse data, pass --orthologs mouse-to-human", source, n_case,
                    report.n_matched_genes, case_example)
    return col_token, _check_fraction(report, gene_ids, vocab, min_fraction=min_fraction, source=source)


#: the last few gene-id matchings: a run resolves each input twice (default id source check), and a corpus
#: of many files usually repeats one var; entries hold their tables, so an identity test cannot go stale
_MATCHED: list[tuple[Any, ...]] = []


def _ids_key(gene_ids: Sequence[str] | np.ndarray) -> tuple[tuple[Any, ...], list[str] | None]:
    """The memo key of ``gene_ids`` (their content), and the stripped ids when the key needed them.

    A numpy ``str`` array is keyed by its buffer, without making a Python string per gene (a 60,000-gene
    var index: ~0.1 ms instead of ~40); other inputs by their stripped text.
    """
    import hashlib

    if isinstance(gene_ids, np.ndarray) and gene_ids.dtype.kind == "U" and gene_ids.ndim == 1:
        digest = hashlib.blake2b(np.ascontiguousarray(gene_ids).tobytes(), digest_size=16).digest()
        return ("U", gene_ids.dtype.itemsize, len(gene_ids), digest), None
    ids = [str(g).strip() for g in gene_ids]
    digest = hashlib.blake2b("\x00".join(ids).encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return ("text", len(ids), digest), ids


def _match_all(gene_ids: Sequence[str] | np.ndarray, vocab: GeneVocab, gene_name_map: Mapping[str, str] | None,
               ortholog_map: Mapping[str, str] | None) -> tuple[np.ndarray, dict[str, int], str, list[str]]:
    """:func:`match_gene_id` over every column: (token per column, matches per route, a case-only example,
    up to 10 unmatched ids). Memoised on the ids' content and the tables' identity."""
    key, ids = _ids_key(gene_ids)
    for k, v, g, o, res in _MATCHED:
        if k == key and v is vocab and g is gene_name_map and o is ortholog_map:
            col_token, counts, case_example, unmatched = res
            return col_token.copy(), dict(counts), case_example, list(unmatched)
    if ids is None:
        ids = [g.strip() for g in gene_ids.tolist()]
    col_token = np.full(len(ids), -1, dtype=np.int32)
    counts = dict.fromkeys(("ensembl", "version", "symbol", "ortholog", "case"), 0)
    case_example = ""
    unmatched: list[str] = []
    upper = case_insensitive_map(gene_name_map, ortholog_map)
    for j, g in enumerate(ids):
        t, how = match_gene_id(g, vocab, gene_name_map=gene_name_map, ortholog_map=ortholog_map, upper_map=upper)
        if t >= 0:
            col_token[j] = t
            counts[how] += 1
            case_example = case_example or (g if how == "case" else "")
        elif len(unmatched) < 10:
            unmatched.append(g)
    _MATCHED.insert(0, (key, vocab, gene_name_map, ortholog_map, (col_token.copy(), dict(counts), case_example,
                                                                   list(unmatched))))
    del _MATCHED[4:]
    return col_token, counts, case_example, unmatched


def _resolve_mapped(gene_ids: Sequence[str] | np.ndarray, vocab: GeneVocab,
                    gene_mapping: Mapping[str, str]) -> tuple[np.ndarray, GeneMatchReport]:
    """Geneformer's ``collapse_gene_ids`` route: upper-case, map, keep what lands in the vocabulary."""
    col_token = np.full(len(gene_ids), -1, dtype=np.int32)
    unmatched: list[str] = []
    for j, raw in enumerate(gene_ids):
        g = str(raw).strip()
        e = gene_mapping.get(g.upper())
        t = vocab.tokenizable(e) if e is not None else -1
        if t >= 0:
            col_token[j] = t
        elif len(unmatched) < 10:
            unmatched.append(g)
    matched = col_token[col_token >= 0]
    n_dup = int(matched.size - np.unique(matched).size)
    return col_token, GeneMatchReport(len(gene_ids), int(matched.size), 0, 0, 0, 0, n_dup, unmatched,
                                      n_by_mapping=int(matched.size))


def _check_fraction(report: GeneMatchReport, gene_ids: Sequence[str] | np.ndarray, vocab: GeneVocab, *,
                    min_fraction: float, source: str) -> GeneMatchReport:
    if report.fraction < min_fraction:
        first = [str(g) for g in list(gene_ids)[:5]]
        hint = ("if these are gene symbols pass a symbol table (--gene-name-map); if they are mouse genes "
                "pass --orthologs mouse-to-human; if the ids are in another var column pass "
                "--gene-id-column")
        msg = (f"{source}: only {report.n_matched_genes} of {report.n_input_genes} genes "
               f"({report.fraction:.1%}) match the vocabulary ({vocab.token_dictionary_path}); "
               f"first gene ids: {first}; {hint}. Refusing to write near-empty cells "
               f"(lower min_gene_match to override).")
        raise GeneMatchError(msg)
    return report


def check_gene_id_choice(
    current: GeneMatchReport,
    candidates: Mapping[str, Sequence[str] | np.ndarray],
    vocab: GeneVocab,
    *,
    gene_name_map: Mapping[str, str] | None = None,
    ortholog_map: Mapping[str, str] | None = None,
    current_name: str = "the var index",
    source: str = "input",
) -> None:
    """Refuse a default gene-id source when another var column matches the vocabulary clearly better.

    E.g. ``scanpy.read_10x_h5(...).write_h5ad(...)`` puts symbols in the var index and Ensembl ids in
    ``var["gene_ids"]``; the symbols match fewer genes, and the cells would silently lose counts.

    Parameters
    ----------
    current
        Match report of the gene ids in use.
    candidates
        Other var columns (name -> values) to compare with.
    vocab, gene_name_map, ortholog_map
        As in :func:`resolve_genes`.
    current_name
        How the ids in use are named in the message.
    source
        Name of the input, for messages.

    Raises
    ------
    GeneMatchError
        A candidate matches at least 10% (and 10 genes) more genes; the message gives both numbers
        and the ``--gene-id-column`` to pass.
    """
    best, best_name = None, None
    for name, values in candidates.items():
        _, rep = resolve_genes(values, vocab, gene_name_map=gene_name_map, ortholog_map=ortholog_map,
                               min_fraction=0.0, source=source, allow_case_insensitive=True)
        if best is None or rep.n_matched_genes > best.n_matched_genes:
            best, best_name = rep, name
    if best is None or best.n_matched_genes < max(1.1 * current.n_matched_genes, current.n_matched_genes + 10):
        return
    msg = (f"{source}: var column {best_name!r} matches {best.n_matched_genes:,} of {best.n_input_genes:,} genes "
           f"({best.fraction:.1%}) of the vocabulary, {current_name} only {current.n_matched_genes:,} "
           f"({current.fraction:.1%}); pass --gene-id-column {best_name} (or --gene-id-column with the column "
           "you mean, 'index' for the var index, to keep your choice)")
    raise GeneMatchError(msg)
