"""GeneCompass runs of ``scfm pretrain``: which family the data are, and the model to train.

GeneCompass token datasets carry per-token values (``scfm tokenize --preset genecompass``); they train a
:class:`~scfm_fast.model.genecompass.GeneCompassModel` with :class:`.objectives.GeneCompassObjective`.
The model comes from ``--init`` (a GeneCompass checkpoint, knowledge tables and homolog remap included)
or, from scratch, from ``--preset genecompass-base`` / a GeneCompass ``--config`` plus the four
prior-knowledge tables given with ``--knowledge`` (each a pickle: gene id -> vector, keyed like the token
dictionary). Checkpoints are written in GeneCompass's own layout (``save_genecompass``).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._errors import InputFileError, UsageError
from ..model.config import EncoderConfig
from ..model.genecompass import KNOWLEDGE, GeneCompassConfig, GeneCompassModel
from .presets import PRESETS, PretrainOptions


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
    if opts.knowledge and opts.init is not None:
        msg = "--knowledge builds the tables of a model trained from scratch; --init's checkpoint already holds them"
        raise UsageError(msg)
    return data_gc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        msg = f"{path}: cannot read the model config ({e})"
        raise InputFileError(msg) from e


def build_genecompass(cfg: EncoderConfig, opts: PretrainOptions) -> GeneCompassModel:
    """The GeneCompass model of a run: ``--init``'s checkpoint, or a fresh one with ``--knowledge`` tables."""
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
    return model.train()


def parse_knowledge(spec: str | Mapping[str, str] | None) -> dict[str, str] | None:
    """``"promoter=A.pkl,co_exp=B.pkl,gene_family=C.pkl,peca_grn=D.pkl"`` (or a mapping) -> dict."""
    if spec is None or isinstance(spec, Mapping):
        return None if spec is None else dict(spec)
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, path = part.partition("=")
        if not sep or name not in KNOWLEDGE:
            msg = f"--knowledge {spec!r}: give NAME=PKL pairs with NAME in {', '.join(KNOWLEDGE)}"
            raise UsageError(msg)
        out[name] = path
    return out


def knowledge_tables(files: Mapping[str, str], token_of: Mapping[str, int], *, vocab_size: int,
                     needed: Sequence[str]) -> dict[str, np.ndarray]:
    """``[vocab, dim]`` float32 tables from the ``files`` (gene id -> vector); genes absent from a file get zeros.

    Raises
    ------
    UsageError
        A table the model needs is missing, or one is given that it does not use.
    InputFileError
        An unreadable file, vectors of different widths, or a file that names no gene of the dictionary
        (e.g. keyed by symbols instead of the dictionary's gene ids).
    """
    missing, extra = sorted(set(needed) - set(files)), sorted(set(files) - set(needed))
    if missing or extra:
        msg = (f"--knowledge: the model uses the tables {list(needed)}; "
               + (f"missing {missing}" if missing else f"not used: {extra}")
               + " (give NAME=PKL, a pickle of gene id -> vector, for each; or switch the table off in --config)")
        raise UsageError(msg)
    out, dims = {}, set()
    for name in needed:
        path = files[name]
        try:
            with open(path, "rb") as f:
                d = pickle.load(f)  # noqa: S301 - a user-given table, as GeneCompass's own pickles
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            msg = f"{path}: cannot read the {name} knowledge table ({type(e).__name__}: {e})"
            raise InputFileError(msg) from e
        if not isinstance(d, Mapping) or not d:
            msg = f"{path}: the {name} knowledge table must be a non-empty dict gene id -> vector"
            raise InputFileError(msg)
        hits = [(token_of[g], np.asarray(v, np.float32).reshape(-1)) for g, v in d.items() if g in token_of]
        if not hits:
            msg = (f"{path}: none of its {len(d)} gene ids is in the token dictionary (e.g. {next(iter(d))!r}); key "
                   "the table by the dictionary's gene ids")
            raise InputFileError(msg)
        dims |= {v.size for _, v in hits}
        if len(dims) > 1:
            msg = f"{path}: knowledge vectors of different widths {sorted(dims)} (all four tables must share one)"
            raise InputFileError(msg)
        t = np.zeros((vocab_size, dims.copy().pop()), np.float32)
        for tok, v in hits:
            t[int(tok)] = v
        out[name] = t
    return out
