"""GeneCompass runs of ``scfm pretrain``: which family the data are, and the model to train.

GeneCompass token datasets carry per-token values (``scfm tokenize --preset genecompass``); they train a
:class:`~scfm_fast.model.genecompass.GeneCompassModel` with :class:`.objectives.GeneCompassObjective`.
The model comes from ``--init`` (a GeneCompass checkpoint, knowledge tables and homolog remap included)
or, from scratch, from ``--preset genecompass-base`` / a GeneCompass ``--config`` plus the four
prior-knowledge tables given with ``--knowledge`` (:mod:`.knowledge`) and the mouse -> human homolog remap
given with ``--homologs`` (:mod:`.homologs`). Checkpoints are written in GeneCompass's own layout
(``save_genecompass``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._errors import InputFileError, UsageError
from ..model.config import EncoderConfig
from ..model.genecompass import GeneCompassConfig, GeneCompassModel
from .presets import PRESETS, PretrainOptions

log = logging.getLogger("scfm_fast")


def is_genecompass_run(paths: Sequence[str | Path], opts: PretrainOptions) -> bool:
    """Whether the datasets are GeneCompass tokens; refuse a model option of the other family."""
    from ..model.registry import is_genecompass_config
    from ..store.cells import open_cells

    gc = {open_cells(p).has_values for p in paths}
    if len(gc) > 1:
        msg = f"{list(map(str, paths))}: some datasets carry GeneCompass values and some do not; use one family"
        raise UsageError(msg)
    data_gc = gc.pop()
    if opts.init is not None:
        src, model_gc = f"--init {opts.init}", is_genecompass_config(_read_json(Path(opts.init) / "config.json"))
    elif opts.config is not None:
        src, model_gc = f"--config {opts.config}", is_genecompass_config(_read_json(Path(opts.config)))
    else:
        src, model_gc = f"--preset {opts.preset}", PRESETS[opts.preset].get("family") == "genecompass"
    if data_gc != model_gc:
        data = "GeneCompass tokens (with values)" if data_gc else "Geneformer tokens (no values)"
        model = "a GeneCompass model" if model_gc else "a Geneformer (BERT) model"
        msg = (f"{paths[0]}: {data}, but {src} is {model}; use --preset genecompass-base / a GeneCompass checkpoint "
               "for GeneCompass tokens, a Geneformer preset or checkpoint for Geneformer tokens")
        raise UsageError(msg)
    scratch = [f for f, v in (("--knowledge", opts.knowledge), ("--homologs", opts.homologs)) if v]
    if scratch and not data_gc:
        msg = f"{', '.join(scratch)} only apply to GeneCompass pretraining (GeneCompass tokens, with values)"
        raise UsageError(msg)
    if scratch and opts.init is not None:
        msg = (f"{', '.join(scratch)} build the knowledge tables / homolog remap of a model trained from scratch; "
               f"--init's checkpoint already holds them")
        raise UsageError(msg)
    return data_gc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        msg = f"{path}: cannot read the model config ({e})"
        raise InputFileError(msg) from e


def build_genecompass(cfg: EncoderConfig, opts: PretrainOptions) -> GeneCompassModel:
    """The GeneCompass model of a run: ``--init``'s checkpoint, or a fresh one with ``--knowledge`` tables and
    the ``--homologs`` remap (without it, the identity: mouse genes read their own knowledge rows)."""
    from ..model.genecompass_checkpoint import load_genecompass
    from .build import _bert_init

    if opts.init is not None:
        model = load_genecompass(opts.init, token_dictionary=opts.token_dictionary)
        if opts.dropout is not None:
            model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = float(opts.dropout)
        return model.train()
    raw = _read_json(Path(opts.config)) if opts.config is not None else {k: True for k in (
        "use_values", "use_promoter", "use_co_exp", "use_gene_family", "use_peca_grn", "use_cls_token")}
    if opts.token_dictionary is None:
        msg = "GeneCompass pretraining from scratch needs --token-dictionary (the knowledge tables are keyed by gene id)"
        raise UsageError(msg)
    from ..vocab.dictionaries import load_pickle_dict
    from ..vocab.symbols import dictionary_species
    from .homologs import homologous_index
    from .knowledge import knowledge_tables

    token_of = load_pickle_dict(opts.token_dictionary, what="token dictionary")
    flags = GeneCompassConfig.from_dict({**raw, **cfg.to_hf_dict()}).knowledge
    tables = knowledge_tables(opts.knowledge or {}, token_of, vocab_size=cfg.vocab_size, needed=flags)
    dim = next(iter(tables.values())).shape[1] if tables else 768
    gcfg = GeneCompassConfig.from_dict({**raw, **cfg.to_hf_dict()}, knowledge_dim=dim)
    model = GeneCompassModel(gcfg)
    _bert_init(model, cfg)
    emb = model.bert.embeddings
    with torch.no_grad():
        for k, t in tables.items():
            getattr(emb, f"{k}_knowledge").copy_(torch.from_numpy(t))
        if opts.homologs is not None:
            emb.homologous_index.copy_(torch.from_numpy(homologous_index(opts.homologs, token_of,
                                                                         vocab_size=cfg.vocab_size)))
    if opts.homologs is None and tables and len(dictionary_species(token_of)) == 2:
        log.warning("%s holds human and mouse genes but no --homologs was given: mouse genes get no human "
                    "homolog's prior knowledge (GeneCompass's remap is the identity here)", opts.token_dictionary)
    return model.train()
