"""What maps source genes to tokens, the same for every input of a run: vocabulary, preset, gene-id
routes (symbol table, orthologs, Geneformer's gene mapping file), options of the core."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import UsageError
from ..vocab import (
    GeneVocab,
    get_preset,
    load_gene_mapping,
    load_gene_name_map,
    load_ortholog_map,
    resolve_genes,
)
from ..vocab.dictionaries import SPECIAL_TOKENS, file_sha256
from ..vocab.gene_ids import SpeciesNameMap, species_name_map
from .species import check_species_options


@dataclass
class TokenizerSpec:
    """Everything that maps source genes to tokens (the same for every input file)."""

    preset: str = "geneformer-v1"
    vocab: GeneVocab | None = None
    gene_name_map: dict[str, str] | None = None
    ortholog_map: dict[str, str] | None = None
    max_len: int | None = None
    min_gene_match: float = 0.2
    allow_non_integer: bool = False
    backend: str = "auto"
    n_threads: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    gene_mapping: dict[str, str] | None = None
    keep_counts: bool = False
    values: bool = False  # GeneCompass: values beside the tokens, and a species per cell
    normalize_total: float | None = None
    species: str | None = None
    species_column: str | None = None

    @classmethod
    def build(cls, *, preset: str = "geneformer-v1", token_dictionary: str | Path | None = None,
              gene_median: str | Path | None = None, gene_name_map: str | Path | None = "auto",
              orthologs: str | Path | None = None, max_len: int | None = None,
              min_gene_match: float = 0.2, allow_non_integer: bool = False, backend: str = "auto",
              n_threads: int | None = None, gene_mapping_file: str | Path | None = None,
              keep_counts: bool = False, species: str | None = None, species_column: str | None = None,
              normalize_total: float | None = None) -> TokenizerSpec:
        """The spec of a run from the tokenize options (see :func:`~scfm_fast.tokenizer.pipeline.tokenize_corpus`);
        front ends pass them with :func:`spec_options` so that this signature is their one list."""
        pre = get_preset(preset)
        _check_options(max_len=max_len, n_special=pre.n_special, n_threads=n_threads)
        check_species_options(pre, species=species, species_column=species_column,
                              normalize_total=normalize_total)
        vocab = GeneVocab.load(token_dictionary=token_dictionary, gene_median=gene_median, preset=preset)
        mapping = None
        if gene_mapping_file is not None:
            # Geneformer's route replaces ours: a symbol or ortholog table would be silently unused
            if (gene_name_map not in (None, "auto")) or orthologs:
                msg = ("--gene-mapping-file is the only gene-id route when given (Geneformer's semantics); "
                       "drop --gene-name-map / --orthologs, or put those ids into the mapping file")
                raise UsageError(msg)
            mapping, gene_name_map = load_gene_mapping(gene_mapping_file), None
        names = None
        if gene_name_map == "auto":
            # a preset with its own symbol table (mouse-geneformer, genecompass) uses it; otherwise the
            # bundled table names V1's genes, and a dictionary of other genes (V2's gc104M, a new corpus)
            # needs its own table (--gene-name-map), never V1's silently.  Ids already in the
            # vocabulary match first, so the symbol table never overrides them.
            if pre.gene_name_map is not None:
                names = load_gene_name_map(pre.gene_name_map)
            elif (preset == "geneformer-v1" and token_dictionary is None) or _genes_of(vocab.token_of) == _v1_genes():
                names = load_gene_name_map()
            else:
                gene_name_map = "auto (off: the token dictionary's genes are not Geneformer V1's; pass --gene-name-map)"
        elif gene_name_map is not None:
            names = load_gene_name_map(gene_name_map)
        if pre.values and (one := species_name_map(pre.gene_name_map if gene_name_map == "auto" else gene_name_map,
                                                   species)) is not None:
            names = one  # a file of one declared species resolves symbols in that species only
        orth = load_ortholog_map(orthologs) if orthologs else None
        spec = cls(preset, vocab, names, orth, pre.max_len if max_len is None else max_len, min_gene_match,
                   allow_non_integer, backend, n_threads, gene_mapping=mapping, keep_counts=keep_counts)
        spec.config = {"preset": preset, "max_len": spec.max_len, "dictionary_hashes": vocab.hashes,
                       "gene_name_map": str(gene_name_map), "orthologs": _path_or_name(orthologs),
                       "allow_non_integer": allow_non_integer, "tie_order": "token id ascending",
                       "special_tokens": {t: vocab.token_of[t] for t in SPECIAL_TOKENS if t in vocab.token_of}}
        # recorded only when used, so that outputs of earlier versions still resume
        if mapping is not None:
            spec.config["gene_mapping_file"] = {"path": _path_or_name(gene_mapping_file),
                                                "sha256": file_sha256(gene_mapping_file)}
        if keep_counts:
            spec.config["keep_counts"] = True
        if pre.values:
            spec.values, spec.normalize_total = True, normalize_total
            spec.species, spec.species_column = species, species_column
            spec.config.update(values=True, normalize_total=normalize_total, species=species,
                               species_column=species_column)
            if isinstance(names, SpeciesNameMap):  # recorded: an output tokenized with the joint table will not resume
                spec.config["gene_name_map_species"] = species
        # validates that the dictionary holds the preset's special tokens
        spec.cls_id, spec.eos_id = vocab.special_id(pre.cls), vocab.special_id(pre.eos)
        return spec

    def resolve(self, gene_ids, *, source: str):
        """Token id per gene column of one input, and its match report."""
        return resolve_genes(gene_ids, self.vocab, gene_name_map=self.gene_name_map,
                             ortholog_map=self.ortholog_map, gene_mapping=self.gene_mapping,
                             min_fraction=self.min_gene_match, source=source)

    def tokenize_csr(self, indptr, indices, data, *, col_token, totals=None, sums=None):
        from .rank import tokenize_rank

        return tokenize_rank(indptr, indices, data, col_token=col_token,
                             token_median=self.vocab.token_median, max_len=self.max_len,
                             cls_token=self.cls_id, eos_token=self.eos_id, totals=totals,
                             allow_non_integer=self.allow_non_integer, backend=self.backend,
                             n_threads=self.n_threads, sums=sums)

    def tokenize_values_csr(self, indptr, indices, data, *, col_token, totals=None, sums=None):
        from .values import tokenize_values

        return tokenize_values(indptr, indices, data, col_token=col_token,
                               token_median=self.vocab.token_median, max_len=self.max_len,
                               normalize_total=self.normalize_total, totals=totals,
                               allow_non_integer=self.allow_non_integer, backend=self.backend,
                               n_threads=self.n_threads, sums=sums)


@functools.cache
def spec_option_names() -> tuple[str, ...]:
    """The keywords of :meth:`TokenizerSpec.build`: the options every tokenize front end forwards to it."""
    return tuple(inspect.signature(TokenizerSpec.build).parameters)


def spec_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The :meth:`TokenizerSpec.build` keywords out of a front end's options (e.g. its ``locals()``), so that
    the forwarded list is written once, in ``build``'s signature. A front end must take every one of them."""
    missing = [k for k in spec_option_names() if k not in options]
    if missing:
        msg = f"a tokenize front end lacks the TokenizerSpec options {missing}"
        raise TypeError(msg)
    return {k: options[k] for k in spec_option_names()}


def _genes_of(token_of: dict[str, int]) -> frozenset[str]:
    return frozenset(g for g in token_of if g not in SPECIAL_TOKENS)


@functools.cache
def _v1_genes() -> frozenset[str]:
    """The genes of Geneformer V1's bundled token dictionary (what its symbol table was made for)."""
    return _genes_of(GeneVocab.load(preset="geneformer-v1").token_of)


def _path_or_name(value: Any) -> str:
    """A table option as recorded in the manifest: a bundled name as is, a file as an absolute path (so
    that later commands run from another directory find it)."""
    if value is None or not Path(str(value)).exists():
        return str(value)
    return str(Path(str(value)).resolve())


def _check_options(*, max_len: int | None, n_special: int, n_threads: int | None,
                   chunk_size: int = 1) -> None:
    """Refuse option values that would be ignored or fail deep inside the run."""
    if max_len is not None and max_len < n_special + 1:
        msg = (f"--max-len {max_len} leaves no room for genes after {n_special} special tokens; pass at "
               f"least {n_special + 1}")
        raise UsageError(msg)
    if n_threads is not None and n_threads < 1:
        msg = f"--workers must be at least 1 (or left out for all cores), got {n_threads}"
        raise UsageError(msg)
    if chunk_size < 1:
        msg = f"--chunk-size must be at least 1, got {chunk_size}"
        raise UsageError(msg)
