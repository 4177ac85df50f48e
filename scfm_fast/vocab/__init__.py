"""Gene vocabularies: dictionaries, gene-id resolution, orthologs."""

from .dictionaries import PRESETS, GeneVocab, Preset, get_preset
from .gene_ids import GeneMatchReport, load_gene_mapping, load_gene_name_map, resolve_genes, strip_version
from .orthologs import load_ortholog_map
from .targets import TargetResolver

__all__ = ["PRESETS", "GeneVocab", "Preset", "get_preset", "GeneMatchReport", "load_gene_mapping",
           "load_gene_name_map", "resolve_genes", "strip_version", "load_ortholog_map", "TargetResolver"]
