"""Encoder configuration, read from a Hugging Face BERT ``config.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..kernels.activations import ACTIVATIONS

_ACTIVATIONS = tuple(ACTIVATIONS)


@dataclass
class EncoderConfig:
    """Shape and options of a BERT-style encoder (Geneformer V1/V2, mouse-Geneformer).

    Field names follow Hugging Face ``BertConfig`` so a ``config.json`` maps one to one.
    """

    vocab_size: int = 25_426
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 512
    hidden_act: str = "relu"
    max_position_embeddings: int = 2_048
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    position_embedding_type: str = "absolute"
    tie_word_embeddings: bool = True  # MLM decoder shares the word embeddings (kept for save_encoder)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            msg = (
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
            raise ValueError(msg)
        if self.hidden_act not in _ACTIVATIONS:
            msg = f"hidden_act={self.hidden_act!r} is not supported; use one of {_ACTIVATIONS}"
            raise ValueError(msg)
        if self.position_embedding_type != "absolute":
            # relative_key(_query) adds distance embeddings inside attention, which no kernel here computes
            msg = (f"position_embedding_type={self.position_embedding_type!r} is not supported; only 'absolute' "
                   "position embeddings (Geneformer's) are")
            raise ValueError(msg)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        """From a ``config.json`` dict; keys it lacks take ``BertConfig``'s defaults where those matter.

        Raises ``ValueError`` for settings the encoder cannot run (a decoder: causal attention).
        """
        if d.get("is_decoder") or d.get("add_cross_attention"):
            msg = "is_decoder / add_cross_attention is set: only bidirectional BERT encoders are supported"
            raise ValueError(msg)
        names = {f.name for f in fields(cls)}
        # transformers reads a missing hidden_act as GELU, not Geneformer's ReLU (the other defaults
        # that differ set weight shapes, which load_encoder checks)
        return cls(**{"hidden_act": "gelu", **{k: v for k, v in d.items() if k in names}})

    @classmethod
    def from_json(cls, path: str | Path) -> EncoderConfig:
        """Read ``config.json`` (a file, or a checkpoint directory holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            msg = f"{p}: no config.json found; pass a Hugging Face BERT checkpoint directory"
            raise FileNotFoundError(msg)
        return cls.from_dict(json.loads(p.read_text()))

    def to_hf_dict(self) -> dict[str, Any]:
        """A dict that ``transformers.BertConfig(**d)`` accepts."""
        d = asdict(self)
        d.update(model_type="bert", architectures=["BertForMaskedLM"])
        return d
