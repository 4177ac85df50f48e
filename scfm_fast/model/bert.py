"""BERT encoder with Hugging Face parameter names (so HF checkpoints load by name).

The modules here only hold weights; the maths lives once in :mod:`scfm_fast.model.layers`.
``BertEncoderModel.forward_reference`` is the plain, padded, eager PyTorch path (HF ``BertModel``'s
eager attention): the oracle that the unpadded fast path, the embedding extractor and the perturbation
engine are tested against. ``forward_varlen`` is the packed fast path, differentiable, with dropout in
train mode (training uses it).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels.activations import activation_fn
from .config import EncoderConfig
from .layers import EncoderParams

__all__ = ["BertEncoderModel", "activation_fn"]


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class BertAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


class BertOutput(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class BertLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)


class BertEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertEncoderModel(nn.Module):
    """Embeddings + encoder layers of a BERT model (no pooler, no MLM head).

    Parameter names equal those of ``transformers.BertModel`` (``embeddings.*``, ``encoder.layer.N.*``).
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.act = activation_fn(cfg.hidden_act)

    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def resolve_layer(self, layer: int) -> int:
        """Map a layer index (negative counts from the end, ``-1`` = last) to the number of layers to run.

        Layer ``0`` is the embedding output; layer ``k`` is the output of the k-th encoder layer.
        """
        n = self.config.num_hidden_layers
        k = layer if layer >= 0 else n + 1 + layer
        if not 0 <= k <= n:
            msg = f"layer={layer} is out of range for a model with {n} layers (use 0..{n} or -1..-{n + 1})"
            raise ValueError(msg)
        return k

    @torch.no_grad()
    def forward_reference(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, layer: int = -1
    ) -> torch.Tensor:
        """Plain padded eager forward; returns hidden states ``(B, L, H)`` of ``layer``.

        ``attention_mask`` is 1 for real tokens, 0 for padding (default: ``input_ids != pad``).
        """
        return self.forward_padded(input_ids, attention_mask, layer=layer)

    def forward_padded(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, layer: int = -1
    ) -> torch.Tensor:
        """:meth:`forward_reference` with autograd (and dropout in train mode): padded ``(B, L)`` input."""
        n_run = self.resolve_layer(layer)
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        h = EncoderParams(self).embed(input_ids, pos)
        return self.encoder_padded(h, attention_mask, n_layers=n_run)

    def encoder_padded(self, h: torch.Tensor, attention_mask: torch.Tensor, *, n_layers: int) -> torch.Tensor:
        """Run the first ``n_layers`` encoder layers on padded embedding outputs ``(B, L, H)``.

        ``attention_mask`` is ``(B, L)``, 1 for real rows, 0 for padding (which no row attends to).
        """
        return EncoderParams(self).run_padded(h, attention_mask, n_layers=n_layers)

    # ------------------------------------------------------------------ fast, unpadded path
    def forward_varlen(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        *,
        layer: int = -1,
        position_ids: torch.Tensor | None = None,
        attn_backend: str = "auto",
        grad_checkpointing: bool = False,
    ) -> torch.Tensor:
        """Hidden states ``(total, H)`` of ``layer`` for packed cells (no padding anywhere).

        Parameters
        ----------
        input_ids
            ``(total,)`` token ids of all cells back to back.
        cu_seqlens
            ``int32 (B+1,)`` cell boundaries (see :mod:`scfm_fast.kernels.padding`).
        max_seqlen
            Longest cell in the batch.
        layer
            Which hidden states to return (0 = embeddings, -1 = last layer); later layers are not run.
        position_ids
            Position of each row inside its cell (default: derived from ``cu_seqlens``).
        attn_backend
            ``"auto"`` (flash-attn -> SDPA -> Triton -> reference) or one backend name.
        grad_checkpointing
            Recompute each layer's activations in the backward pass instead of keeping them (training).

        Returns
        -------
        torch.Tensor
            ``(total, H)``; float32 under autocast (the residual stream stays float32).
        """
        from ..kernels.padding import position_ids_from_cu_seqlens

        n_run = self.resolve_layer(layer)
        if position_ids is None:
            position_ids = position_ids_from_cu_seqlens(cu_seqlens, input_ids.numel())
        if max_seqlen > self.config.max_position_embeddings:
            msg = (f"a cell has {max_seqlen} tokens but the model has {self.config.max_position_embeddings} "
                   "positions; tokenize with this model's input size")
            raise ValueError(msg)
        h = EncoderParams(self, fused=True).embed(input_ids, position_ids)
        return self.encoder_varlen(h, cu_seqlens, max_seqlen, n_layers=n_run, attn_backend=attn_backend,
                                   grad_checkpointing=grad_checkpointing)

    def encoder_varlen(self, h: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *, n_layers: int,
                       attn_backend: str = "auto", grad_checkpointing: bool = False) -> torch.Tensor:
        """Run the first ``n_layers`` encoder layers on packed embedding outputs ``(total, H)``.

        ``cu_seqlens`` / ``max_seqlen`` delimit the cells as in :meth:`forward_varlen`.
        """
        P = EncoderParams(self, fused=True)
        for i in range(n_layers):
            if grad_checkpointing and torch.is_grad_enabled():
                # the RNG state is restored for the recomputation, so dropout masks match
                h = checkpoint(P.layer_varlen, i, h, cu_seqlens, max_seqlen, attn_backend=attn_backend,
                               use_reentrant=False)
            else:
                h = P.layer_varlen(i, h, cu_seqlens, max_seqlen, attn_backend=attn_backend)
        return h

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *, layer: int = -1,
                attn_backend: str = "auto") -> torch.Tensor:
        """Alias of :meth:`forward_varlen` (packed input)."""
        return self.forward_varlen(input_ids, cu_seqlens, max_seqlen, layer=layer, attn_backend=attn_backend)
