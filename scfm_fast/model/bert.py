"""BERT encoder with Hugging Face parameter names (so HF checkpoints load by name).

``BertEncoderModel.forward_reference`` is the plain, padded, eager PyTorch path: the oracle that
the unpadded fast path, the embedding extractor and the perturbation engine are tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig


def activation_fn(name: str):
    """The activation ``hidden_act`` names, as a torch function."""
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name in ("silu", "swish"):
        return F.silu
    msg = f"unsupported activation {name!r}"
    raise ValueError(msg)


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
        return self._forward_padded(input_ids, attention_mask, layer=layer)

    def _forward_padded(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, layer: int = -1
    ) -> torch.Tensor:
        cfg = self.config
        n_run = self.resolve_layer(layer)
        if attention_mask is None:
            attention_mask = input_ids != cfg.pad_token_id
        bsz, seqlen = input_ids.shape
        pos = torch.arange(seqlen, device=input_ids.device)
        e = self.embeddings
        h = e.word_embeddings(input_ids) + e.position_embeddings(pos)[None] + e.token_type_embeddings.weight[0]
        h = e.LayerNorm(h)
        return self.encoder_padded(h, attention_mask, n_layers=n_run)

    def encoder_padded(self, h: torch.Tensor, attention_mask: torch.Tensor, *, n_layers: int) -> torch.Tensor:
        """Run the first ``n_layers`` encoder layers on padded embedding outputs ``(B, L, H)``.

        ``attention_mask`` is ``(B, L)``, 1 for real rows, 0 for padding (which no row attends to).
        """
        cfg = self.config
        bsz, seqlen = h.shape[:2]
        bias = torch.zeros(bsz, 1, 1, seqlen, dtype=h.dtype, device=h.device)
        bias = bias.masked_fill(~attention_mask.bool()[:, None, None, :], torch.finfo(h.dtype).min)
        nh, hd = cfg.num_attention_heads, cfg.head_dim
        for lyr in self.encoder.layer[:n_layers]:
            sa = lyr.attention.self
            q = sa.query(h).view(bsz, seqlen, nh, hd).transpose(1, 2)
            k = sa.key(h).view(bsz, seqlen, nh, hd).transpose(1, 2)
            v = sa.value(h).view(bsz, seqlen, nh, hd).transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + bias
            ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, seqlen, -1)
            h = lyr.attention.output.LayerNorm(lyr.attention.output.dense(ctx) + h)
            ff = lyr.output.dense(self.act(lyr.intermediate.dense(h)))
            h = lyr.output.LayerNorm(ff + h)
        return h

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
        """
        from ..kernels.embeddings import bert_embeddings
        from ..kernels.padding import position_ids_from_cu_seqlens

        cfg = self.config
        n_run = self.resolve_layer(layer)
        if position_ids is None:
            position_ids = position_ids_from_cu_seqlens(cu_seqlens, input_ids.numel())
        if max_seqlen > cfg.max_position_embeddings:
            msg = (f"a cell has {max_seqlen} tokens but the model has {cfg.max_position_embeddings} positions; "
                   "tokenize with this model's input size")
            raise ValueError(msg)
        e = self.embeddings
        h = bert_embeddings(input_ids, position_ids, e.word_embeddings.weight, e.position_embeddings.weight,
                            e.token_type_embeddings.weight[0], e.LayerNorm.weight, e.LayerNorm.bias, e.LayerNorm.eps)
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        h = h.to(dtype)
        return self.encoder_varlen(h, cu_seqlens, max_seqlen, n_layers=n_run, attn_backend=attn_backend)

    def encoder_varlen(self, h: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *, n_layers: int,
                       attn_backend: str = "auto") -> torch.Tensor:
        """Run the first ``n_layers`` encoder layers on packed embedding outputs ``(total, H)``.

        ``cu_seqlens`` / ``max_seqlen`` delimit the cells as in :meth:`forward_varlen`.
        """
        from ..kernels.attention import varlen_attention
        from ..kernels.bias_act import bias_act
        from ..kernels.layer_norm import add_layer_norm

        cfg = self.config
        nh, hd = cfg.num_attention_heads, cfg.head_dim
        for lyr in self.encoder.layer[:n_layers]:
            sa = lyr.attention.self
            # one GEMM for q, k and v
            w_qkv = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight])
            b_qkv = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias])
            qkv = F.linear(h, w_qkv, b_qkv).view(-1, 3, nh, hd)
            ctx = varlen_attention(qkv[:, 0].contiguous(), qkv[:, 1].contiguous(), qkv[:, 2].contiguous(),
                                   cu_seqlens, max_seqlen, backend=attn_backend)
            ao = lyr.attention.output
            a = F.linear(ctx.reshape(-1, cfg.hidden_size), ao.dense.weight, ao.dense.bias)
            h = add_layer_norm(a, h, ao.LayerNorm.weight, ao.LayerNorm.bias, ao.LayerNorm.eps).to(a.dtype)
            inter = bias_act(F.linear(h, lyr.intermediate.dense.weight), lyr.intermediate.dense.bias, cfg.hidden_act)
            o = F.linear(inter, lyr.output.dense.weight, lyr.output.dense.bias)
            h = add_layer_norm(o, h, lyr.output.LayerNorm.weight, lyr.output.LayerNorm.bias,
                               lyr.output.LayerNorm.eps).to(o.dtype)
        return h

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *, layer: int = -1,
                attn_backend: str = "auto") -> torch.Tensor:
        """Alias of :meth:`forward_varlen` (packed input)."""
        return self.forward_varlen(input_ids, cu_seqlens, max_seqlen, layer=layer, attn_backend=attn_backend)
