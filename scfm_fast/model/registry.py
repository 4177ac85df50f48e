"""Checkpoint config -> model family, and each family's loader.

A family is a detector (does this ``config.json`` dict belong to it?) and a loader
(``loader(path, *, device, dtype, return_head)``). Families are tried in order; the first whose detector
accepts the config loads it. Today: ``genecompass`` (its config is an ordinary BERT config plus the keys
in :data:`GENECOMPASS_KEYS`; the loader is ``scfm_fast.model.genecompass_checkpoint.load_genecompass``) and ``bert`` (Geneformer V1/V2, mouse-Geneformer: any other BERT config).
:func:`register_family` adds or replaces one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import InputFileError

Detector = Callable[[dict[str, Any]], bool]
Loader = Callable[..., Any]

# config.json keys that only GeneCompass writes (see ../shared/GENECOMPASS.md)
GENECOMPASS_KEYS = ("use_values", "use_promoter", "use_co_exp", "use_gene_family", "use_peca_grn", "use_cls_token")


@dataclass(frozen=True)
class ModelFamily:
    """One model family: ``detect(config_dict)`` and ``load(path, *, device, dtype, return_head)``."""

    name: str
    detect: Detector
    load: Loader


def is_genecompass_config(cfg: dict[str, Any]) -> bool:
    """A GeneCompass checkpoint: its config carries GeneCompass's own switches."""
    return any(k in cfg for k in GENECOMPASS_KEYS)


def is_bert_config(cfg: dict[str, Any]) -> bool:
    """A BERT checkpoint (Geneformer V1/V2, mouse-Geneformer): ``model_type`` bert, or no model_type."""
    return cfg.get("model_type", "bert") == "bert"


def _lazy(module: str, name: str, family: str) -> Loader:
    """A loader imported on first use, so families can live in modules that import this one."""

    def load(path: str | Path, **kw: Any) -> Any:
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            msg = (f"{path}: a {family} checkpoint, which this version of scfm_fast cannot load "
                   f"({module}.{name} is not available: {e})")
            raise InputFileError(msg) from e
        return fn(path, **kw)

    return load


FAMILIES: dict[str, ModelFamily] = {
    "genecompass": ModelFamily("genecompass", is_genecompass_config,
                               _lazy("scfm_fast.model.genecompass_checkpoint", "load_genecompass", "GeneCompass")),
    "bert": ModelFamily("bert", is_bert_config, _lazy("scfm_fast.model.checkpoint", "load_bert_encoder", "BERT")),
}


def register_family(name: str, *, detector: Detector, loader: Loader, before: str | None = None) -> None:
    """Add (or replace) a family; ``before`` names a family it must be tried ahead of."""
    fam = ModelFamily(name, detector, loader)
    if name in FAMILIES and before is None:
        FAMILIES[name] = fam
        return
    items = [(k, v) for k, v in FAMILIES.items() if k != name]
    at = next((i for i, (k, _) in enumerate(items) if k == before), len(items))
    items.insert(at, (name, fam))
    FAMILIES.clear()
    FAMILIES.update(items)


def family_of(cfg: dict[str, Any], *, source: str = "config.json") -> ModelFamily:
    """The first family whose detector accepts ``cfg``; ``InputFileError`` naming ``source`` if none does."""
    for fam in FAMILIES.values():
        if fam.detect(cfg):
            return fam
    msg = (f"{source}: model_type {cfg.get('model_type')!r} is not a supported model family "
           f"({', '.join(FAMILIES)}); scfm_fast runs BERT-family checkpoints (Geneformer, GeneCompass)")
    raise InputFileError(msg)
