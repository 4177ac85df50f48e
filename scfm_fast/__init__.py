"""scfm_fast: a fast, exact engine for single-cell foundation models of the Geneformer family.

Public names are imported lazily so that ``import scfm_fast`` stays cheap (torch is only loaded by
the model, embedding and perturbation APIs).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "tokenize_corpus": "scfm_fast.tokenizer.pipeline",
    "tokenize_anndata": "scfm_fast.tokenizer.in_memory",
    "compute_gene_medians": "scfm_fast.tokenizer.medians",
    "write_gene_dictionaries": "scfm_fast.tokenizer.medians",
    "tokenize_rank": "scfm_fast.tokenizer.rank",
    "rank_tokenize_ref": "scfm_fast.tokenizer.reference",
    "open_reader": "scfm_fast.readers",
    "GeneVocab": "scfm_fast.vocab",
    "resolve_genes": "scfm_fast.vocab",
    "load_ortholog_map": "scfm_fast.vocab",
    "TokenStore": "scfm_fast.store",
    "read_table": "scfm_fast.store",
    "to_hf_dataset": "scfm_fast.store",
    "merge_token_datasets": "scfm_fast.store.merge",
    "EncoderConfig": "scfm_fast.model.config",
    "BertEncoderModel": "scfm_fast.model.bert",
    "load_encoder": "scfm_fast.model.checkpoint",
    "save_encoder": "scfm_fast.model.checkpoint",
    "varlen_attention": "scfm_fast.kernels.attention",
    "embed_tokens": "scfm_fast.embed",
    "embed_cells": "scfm_fast.embed",
    "perturb_cells": "scfm_fast.perturb",
    "perturb_cells_reference": "scfm_fast.perturb",
    "measure_approx_error": "scfm_fast.perturb",
    "gene_stats": "scfm_fast.perturb",
    "plot_gene_stats": "scfm_fast.perturb",
    "select_cells": "scfm_fast.perturb",
    "state_embedding": "scfm_fast.perturb",
    "pretrain_model": "scfm_fast.pretrain",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        msg = f"module 'scfm_fast' has no attribute {name!r}"
        raise AttributeError(msg)
    return getattr(importlib.import_module(mod), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
