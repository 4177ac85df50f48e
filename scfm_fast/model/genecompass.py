"""GeneCompass (Cell Research 2024): value-, knowledge- and species-aware embeddings on the shared BERT encoder.

Each gene row embeds ``[word | raw value | 4 projected prior-knowledge vectors]`` through a small MLP,
adds position and token-type row 0 and a LayerNorm; a species row (``cls_embedding[species]``) is then
prepended, and the rows run through the ordinary post-LN BERT layers of :class:`BertEncoderModel`
(``encoder_padded`` / ``encoder_varlen``; no second encoder here). Mouse cells (species 1) read the
prior knowledge of their genes' human homologs (``homologous_index``); word embeddings keep the
original ids (:mod:`.genecompass_embeddings`, which also caches the gene-only part in inference).
Parameter names are those of GeneCompass's ``BertForMaskedLM`` (:mod:`.genecompass_checkpoint`).
:meth:`GeneCompassModel.forward_padded` is the eager reference, :meth:`GeneCompassModel.forward_varlen` the
fast unpadded path (the species row is one more row per cell in ``cu_seqlens``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.activations import activation_fn
from ..kernels.padding import position_ids_from_cu_seqlens, seq_ids_from_cu_seqlens
from .bert import BertEncoderModel, BertSelfOutput
from .config import EncoderConfig
from .first_rows import layer_varlen_first_rows
from .genecompass_embeddings import GeneCompassEmbeddings
from .layers import EncoderParams

KNOWLEDGE = ("promoter", "co_exp", "gene_family", "peca_grn")  # GeneCompass's concat order
GC_FLAGS = ("use_values", *(f"use_{k}" for k in KNOWLEDGE), "use_cls_token")
ID_LOSS_WEIGHT, VALUE_LOSS_WEIGHT = 0.2, 0.8
IGNORE_INDEX = -100


@dataclass
class GeneCompassConfig:
    """A BERT :class:`EncoderConfig` plus GeneCompass's switches (its ``config.json`` keys)."""

    encoder: EncoderConfig
    use_values: bool = True
    use_promoter: bool = True
    use_co_exp: bool = True
    use_gene_family: bool = True
    use_peca_grn: bool = True
    use_cls_token: bool = True
    knowledge_dim: int = 768  # width of the frozen prior tables (not in config.json: read off the weights)
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json keys, written back unchanged

    @property
    def knowledge(self) -> tuple[str, ...]:
        return tuple(k for k in KNOWLEDGE if getattr(self, f"use_{k}"))

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, knowledge_dim: int = 768) -> GeneCompassConfig:
        """From a GeneCompass ``config.json`` dict (missing switches are off, as in its code)."""
        flags = {k: bool(d.get(k, False)) for k in GC_FLAGS}
        return cls(encoder=EncoderConfig.from_dict(d), knowledge_dim=knowledge_dim, extra=dict(d), **flags)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict GeneCompass's ``BertForMaskedLM`` reads."""
        d = {**self.extra, **self.encoder.to_hf_dict()}
        d.update({k: getattr(self, k) for k in GC_FLAGS})
        return d


class GeneCompassBert(BertEncoderModel):
    """``bert.*`` of GeneCompass: its embeddings, the species rows and the shared BERT layers.

    Only :meth:`encoder_padded` / :meth:`encoder_varlen` are used; the Geneformer token-only forwards
    would ignore values and species, so they refuse.
    """

    def __init__(self, gcfg: GeneCompassConfig) -> None:
        super().__init__(gcfg.encoder)
        self.embeddings = GeneCompassEmbeddings(gcfg)
        if gcfg.use_cls_token:
            self.cls_embedding = nn.Embedding(2, gcfg.encoder.hidden_size)

    def _refuse(self, *_: Any, **__: Any) -> torch.Tensor:
        msg = "a GeneCompass encoder needs values and species: call GeneCompassModel.forward_varlen / forward_padded"
        raise TypeError(msg)

    forward_reference = forward_varlen = forward = _refuse


class _Predictions(nn.Module):
    def __init__(self, cfg: EncoderConfig, n_out: int, *, tied: bool) -> None:
        super().__init__()
        self.transform = BertSelfOutput(cfg)  # the head transform's parameters: dense + LayerNorm, same names
        self.bias = nn.Parameter(torch.zeros(n_out))
        if not tied:  # the MLM decoder is the word-embedding matrix; the value decoder has its own row
            self.decoder = nn.Linear(cfg.hidden_size, n_out, bias=False)


class _Head(nn.Module):
    def __init__(self, cfg: EncoderConfig, n_out: int, *, tied: bool) -> None:
        super().__init__()
        self.predictions = _Predictions(cfg, n_out, tied=tied)


class _EmbWarmup(nn.Module):
    """GeneCompass's prior-knowledge warm-up: ``alpha`` scales the projected priors (1 once warmed up)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("alpha", torch.tensor(1.0))
        self.register_buffer("steps", torch.tensor(0))


class GeneCompassModel(nn.Module):
    """GeneCompass's ``BertForMaskedLM``: encoder, tied MLM head (``cls``) and value head (``cls4value``).

    Parameters
    ----------
    gcfg
        Shapes and switches; see :func:`scfm_fast.model.genecompass_checkpoint.load_genecompass` to read a
        checkpoint.
    """

    def __init__(self, gcfg: GeneCompassConfig) -> None:
        super().__init__()
        self.gcfg = gcfg
        self.config = gcfg.encoder
        self.bert = GeneCompassBert(gcfg)
        self.cls = _Head(gcfg.encoder, gcfg.encoder.vocab_size, tied=True)
        self.cls4value = _Head(gcfg.encoder, 1, tied=False)  # GeneCompass builds (and saves) it either way
        self.emb_warmup = _EmbWarmup()
        self.act = activation_fn(gcfg.encoder.hidden_act)

    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    # ------------------------------------------------------------------ inputs
    def _check(self, input_ids: torch.Tensor, values: torch.Tensor, species: torch.Tensor | None,
               n_cells: int) -> torch.Tensor:
        """Validate inputs; return species as ``(n_cells,)`` int64 (absent = human, as GeneCompass does)."""
        if values.shape != input_ids.shape:
            msg = f"values {tuple(values.shape)} and input_ids {tuple(input_ids.shape)} must have one shape"
            raise ValueError(msg)
        v = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= v):
            msg = (f"token ids must lie in 0..{v - 1} (this checkpoint's vocabulary); got "
                   f"{int(input_ids.min())}..{int(input_ids.max())}: were the cells tokenized with its dictionary?")
            raise ValueError(msg)
        if species is None:
            return torch.zeros(n_cells, dtype=torch.long, device=input_ids.device)
        species = torch.as_tensor(species, device=input_ids.device).reshape(-1).long()
        if species.numel() != n_cells:
            msg = f"species has {species.numel()} entries for {n_cells} cells; give one per cell (0 human, 1 mouse)"
            raise ValueError(msg)
        if species.numel() and not bool(((species == 0) | (species == 1)).all()):
            msg = f"species must be 0 (human) or 1 (mouse); got {sorted(set(species.tolist()))}"
            raise ValueError(msg)
        return species

    def _check_length(self, n: int) -> None:
        if n > self.config.max_position_embeddings:
            msg = (f"a cell has {n} genes but the model has {self.config.max_position_embeddings} positions; "
                   "tokenize with this model's input size")
            raise ValueError(msg)

    # ------------------------------------------------------------------ reference (padded)
    def forward_padded(self, input_ids: torch.Tensor, values: torch.Tensor, species: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, *, layer: int = -1,
                       no_attention_mask: bool = False) -> torch.Tensor:
        """Plain eager padded forward: hidden states ``(B, L+1, H)`` of ``layer`` (row 0 = species row).

        Parameters
        ----------
        input_ids, values
            ``(B, L)`` genes and their values, right-padded with 0.
        species
            ``(B,)`` or ``(B, 1)``: 0 human, 1 mouse (default: all 0).
        attention_mask
            ``(B, L)``, 1 for real genes (default: ``input_ids != pad``).
        layer
            0 = embedding output (with the species row), -1 = last layer.
        no_attention_mask
            Reproduce GeneCompass's own embedding / perturbation scripts, which pass no mask: padded
            positions attend and change every other row. Off by default.

        Without ``use_cls_token`` there is no species row and the result is ``(B, L, H)``. Differentiable
        (the reference for training too); wrap inference in ``torch.inference_mode()``.
        """
        n_run = self.bert.resolve_layer(layer)
        bsz, seqlen = input_ids.shape
        species = self._check(input_ids, values, species, bsz)
        self._check_length(seqlen)
        if no_attention_mask:
            if attention_mask is not None:
                msg = "give either attention_mask or no_attention_mask=True, not both"
                raise ValueError(msg)
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        elif attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        pos = torch.arange(seqlen, device=input_ids.device).expand(bsz, seqlen)
        h = self.bert.embeddings(input_ids, values, species[:, None].expand(bsz, seqlen), pos, self.emb_warmup.alpha)
        mask = attention_mask.bool()
        if self.gcfg.use_cls_token:
            h = torch.cat([self.bert.cls_embedding(species)[:, None].to(h.dtype), h], 1)
            mask = torch.cat([mask.new_ones(bsz, 1), mask], 1)
        return self.bert.encoder_padded(h, mask, n_layers=n_run)

    # ------------------------------------------------------------------ fast (unpadded)
    def forward_varlen(self, input_ids: torch.Tensor, values: torch.Tensor, species: torch.Tensor | None,
                       cu_seqlens: torch.Tensor, max_seqlen: int, *, layer: int = -1, attn_backend: str = "auto",
                       no_attention_mask: bool = False,
                       pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden states of packed cells (no padding anywhere), with one species row in front of each cell.

        Parameters
        ----------
        input_ids, values
            ``(total,)`` genes and values of all cells back to back.
        species
            ``(B,)``: 0 human, 1 mouse (``None``: all human).
        cu_seqlens, max_seqlen
            Cell boundaries of the genes (see :mod:`scfm_fast.kernels.padding`).
        layer
            0 = embedding output, -1 = last layer; later layers are not run.
        attn_backend
            As in :meth:`BertEncoderModel.forward_varlen`.
        no_attention_mask
            GeneCompass-script mode: each cell is padded with ``(0, 0.0)`` genes to ``pad_to`` (default:
            the model's positions, 2,048 for its released checkpoints: its datasets' padded length) and the
            pads attend like genes. ``gene_rows`` still lists the real genes only.
        pad_to
            Padded cell length for ``no_attention_mask`` (only with it).

        Returns
        -------
        (h, gene_rows, cu_seqlens_new)
            ``h`` ``(rows, H)``; ``gene_rows`` ``(total,)`` the row of each input gene in ``h``;
            ``cu_seqlens_new`` ``int32 (B+1,)`` the cell boundaries in ``h`` (species row first).
        """
        n_run = self.bert.resolve_layer(layer)
        h, rows, cu, max_seqlen = self._embed_packed(input_ids, values, species, cu_seqlens, max_seqlen,
                                                     no_attention_mask=no_attention_mask, pad_to=pad_to)
        h = self.bert.encoder_varlen(h, cu, max_seqlen, n_layers=n_run, attn_backend=attn_backend)
        return h, rows, cu

    def forward_species_rows(self, input_ids: torch.Tensor, values: torch.Tensor, species: torch.Tensor | None,
                             cu_seqlens: torch.Tensor, max_seqlen: int, *, layer: int = -1,
                             attn_backend: str = "auto", no_attention_mask: bool = False,
                             pad_to: int | None = None) -> torch.Tensor:
        """The species rows of :meth:`forward_varlen` ``(B, H)`` (``pool="cls"``), in less time (inference).

        Same arguments. The layers before ``layer`` run on every row; ``layer`` itself only for the
        species rows (keys and values of every row), which skips most of that layer's work.
        """
        if not self.gcfg.use_cls_token:
            msg = "this GeneCompass checkpoint has no species row (use_cls_token false); pool the genes instead"
            raise ValueError(msg)
        n_run = self.bert.resolve_layer(layer)
        h, _, cu, max_seqlen = self._embed_packed(input_ids, values, species, cu_seqlens, max_seqlen,
                                                  no_attention_mask=no_attention_mask, pad_to=pad_to)
        if n_run == 0:
            return h[cu[:-1].long()]
        params = EncoderParams(self.bert, fused=True)
        h = params.run_varlen(h, cu, max_seqlen, n_layers=n_run - 1, attn_backend=attn_backend)
        return layer_varlen_first_rows(params, n_run - 1, h, cu)

    def _embed_packed(self, input_ids: torch.Tensor, values: torch.Tensor, species: torch.Tensor | None,
                      cu_seqlens: torch.Tensor, max_seqlen: int, *, no_attention_mask: bool,
                      pad_to: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Checked, packed embedding rows with the species rows: ``(h, gene_rows, cu int32, max_seqlen)``."""
        cu = cu_seqlens.to(device=input_ids.device, dtype=torch.int64)
        n_cells, total = cu.numel() - 1, input_ids.numel()
        species = self._check(input_ids, values, species, n_cells)
        longest = int((cu[1:] - cu[:-1]).max()) if n_cells else 0
        if int(cu[-1]) != total or longest > max_seqlen:
            msg = (f"cu_seqlens (ending at {int(cu[-1])}, longest cell {longest}) does not describe {total} genes "
                   f"with max_seqlen={max_seqlen}")
            raise ValueError(msg)
        if pad_to is not None and not no_attention_mask:
            msg = "pad_to only applies with no_attention_mask=True (without it nothing is padded)"
            raise ValueError(msg)
        seq = seq_ids_from_cu_seqlens(cu, total)
        real = torch.arange(total, device=input_ids.device)
        if no_attention_mask:
            pad_to = self.config.max_position_embeddings if pad_to is None else pad_to
            if max_seqlen > pad_to:
                msg = f"no_attention_mask: a cell has {max_seqlen} genes, more than pad_to={pad_to}"
                raise ValueError(msg)
            real = seq * pad_to + position_ids_from_cu_seqlens(cu, total)
            input_ids = input_ids.new_zeros(n_cells * pad_to).index_copy(0, real, input_ids)
            values = values.new_zeros(n_cells * pad_to).index_copy(0, real, values)
            cu = torch.arange(n_cells + 1, device=cu.device) * pad_to
            max_seqlen, total = pad_to, n_cells * pad_to
            seq = seq_ids_from_cu_seqlens(cu, total)
        self._check_length(max_seqlen)
        pos = position_ids_from_cu_seqlens(cu, total)
        h = self.bert.embeddings(input_ids, values, species[seq], pos, self.emb_warmup.alpha)
        if torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.get_autocast_dtype(h.device.type))
        rows = torch.arange(total, device=h.device)
        if self.gcfg.use_cls_token:  # cell i's rows move down by i + 1: its species row and those before
            cu = cu + torch.arange(n_cells + 1, device=cu.device)
            rows = rows + seq + 1
            packed = h.new_empty(total + n_cells, h.shape[1])
            packed[rows] = h
            packed[cu[:-1]] = self.bert.cls_embedding(species).to(h.dtype)
            h, max_seqlen = packed, max_seqlen + 1
        return h, rows[real], cu.to(torch.int32), max_seqlen


    # ------------------------------------------------------------------ heads, pooling, loss
    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """MLM head on gene rows ``(..., H)`` -> ``(..., vocab)`` (decoder tied to the word embeddings)."""
        p = self.cls.predictions
        t = p.transform.LayerNorm(self.act(p.transform.dense(h)))
        return F.linear(t, self.bert.embeddings.word_embeddings.weight, p.bias)

    def value_prediction(self, h: torch.Tensor) -> torch.Tensor:
        """Value head on gene rows ``(..., H)`` -> ``(...)``."""
        if not self.gcfg.use_values:
            msg = "this GeneCompass checkpoint has no value head (use_values is false)"
            raise ValueError(msg)
        p = self.cls4value.predictions
        t = p.transform.LayerNorm(self.act(p.transform.dense(h)))
        return F.linear(t, p.decoder.weight, p.bias).squeeze(-1)

    def gene_rows_padded(self, h: torch.Tensor) -> torch.Tensor:
        """Rows 1..L of a padded output (the genes; row 0 is the species row)."""
        return h[:, 1:] if self.gcfg.use_cls_token else h


def pool_cells(h: torch.Tensor, cu_seqlens_new: torch.Tensor, gene_rows: torch.Tensor, *, pool: str = "cls"
               ) -> torch.Tensor:
    """Cell embeddings ``(B, H)`` float32 from :meth:`GeneCompassModel.forward_varlen`'s outputs.

    ``pool="cls"``: the species row's output; ``pool="mean"``: the mean over the cell's genes
    (padding added by ``no_attention_mask`` excluded).
    """
    from ..kernels.pooling import first_token, segment_mean

    if pool == "cls":
        return first_token(h, cu_seqlens_new)
    if pool == "mean":
        keep = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
        keep[gene_rows] = True
        return segment_mean(h, cu_seqlens_new, keep)
    msg = f"pool={pool!r}: use 'cls' (the species row) or 'mean' (mean over genes)"
    raise ValueError(msg)


def genecompass_loss(logits: torch.Tensor, labels: torch.Tensor, value_pred: torch.Tensor | None = None,
                     labels_values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GeneCompass's pretraining loss over the selected positions (``labels != -100``).

    Returns ``(loss, id_loss, value_loss)`` with ``loss = 0.2 * CE(ids) + 0.8 * MSE(values)``; without a
    value head (``value_pred`` None) the loss is the id loss and ``value_loss`` is 0.
    """
    labels = labels.reshape(-1)
    id_loss = F.cross_entropy(logits.reshape(labels.numel(), -1).float(), labels, ignore_index=IGNORE_INDEX)
    if value_pred is None:
        return id_loss, id_loss, id_loss.new_zeros(())
    if labels_values is None:
        msg = "value_pred given without labels_values"
        raise ValueError(msg)
    sel = labels != IGNORE_INDEX
    value_loss = F.mse_loss(value_pred.reshape(-1)[sel].float(), labels_values.reshape(-1)[sel].float())
    return ID_LOSS_WEIGHT * id_loss + VALUE_LOSS_WEIGHT * value_loss, id_loss, value_loss
