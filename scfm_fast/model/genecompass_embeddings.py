"""GeneCompass's gene-row embeddings, with an inference cache of the part that depends on the gene only.

A gene row is ``cat_fc([word | value | alpha * prior_k(table_k[ids'])...])`` followed by a LayerNorm,
QuickGELU, ``cat_proj``, position + token type and a LayerNorm (``ids'``: the human homolog for mouse
cells). ``cat_fc`` is linear, so it splits into ``G[species, gene] + value * w_value`` where ``G`` (hidden
wide) holds the word and the four knowledge projections, already through ``cat_fc``: per row that saves
four ``768 -> hidden`` projections and most of the ``(5 * hidden + 1) -> hidden`` product. In inference
(no grad, eval mode) ``G`` is filled lazily for the genes seen and reused across calls; it is keyed on
the parameters' identity, version counters, dtype and device and on ``alpha``, so a weight update, a
``load_state_dict``, ``.to()`` or a dtype change rebuilds it. Training and grad mode never use it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .genecompass import GeneCompassConfig


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` (CLIP's GELU approximation, GeneCompass's concat MLP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Prior(nn.Module):
    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_in, hidden)


@dataclass
class _GeneTable:
    """Rows of ``G`` (``species * vocab + gene``) computed so far; ``filled`` marks them."""

    key: tuple
    rows: torch.Tensor
    filled: torch.Tensor


class GeneCompassEmbeddings(nn.Module):
    """Gene-row embeddings (everything before the species row). Knowledge tables are frozen buffers.

    Set ``cache_gene_table = False`` to always run the plain per-row computation (GeneCompass's own).
    """

    cache_gene_table: bool = True

    def __init__(self, gcfg: GeneCompassConfig) -> None:
        super().__init__()
        cfg, h = gcfg.encoder, gcfg.encoder.hidden_size
        self.gcfg = gcfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h, padding_idx=cfg.pad_token_id)
        for k in gcfg.knowledge:
            self.register_buffer(f"{k}_knowledge", torch.zeros(cfg.vocab_size, gcfg.knowledge_dim))
            setattr(self, f"{k}_embeddings", _Prior(gcfg.knowledge_dim, h))
        width = h * (1 + len(gcfg.knowledge)) + int(gcfg.use_values)
        self.concat_embeddings = nn.Sequential(OrderedDict([
            ("cat_fc", nn.Linear(width, h)), ("cat_ln", nn.LayerNorm(h, eps=1e-5)),  # torch's default eps: theirs
            ("cat_gelu", QuickGELU()), ("cat_proj", nn.Linear(h, h))]))
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        # both are saved in GeneCompass's checkpoints; position_ids is kept only to write the same layout
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings)[None])
        self.register_buffer("homologous_index", torch.arange(cfg.vocab_size))
        self._gene_table: _GeneTable | None = None

    def concat_input(self, input_ids: torch.Tensor, values: torch.Tensor, species: torch.Tensor,
                     alpha: torch.Tensor | float = 1.0) -> torch.Tensor:
        """``[word | value | alpha * prior_k(table_k[ids'])...]`` where ``ids'`` is homolog-remapped for species 1.

        ``input_ids``, ``values`` and ``species`` (per row) share one shape; returns shape ``(..., width)``.
        """
        parts = [self.word_embeddings(input_ids)]
        if self.gcfg.use_values:
            parts.append(values.to(parts[0].dtype).unsqueeze(-1))
        if self.gcfg.knowledge:
            kid = torch.where(species == 1, self.homologous_index[input_ids], input_ids)
            for k in self.gcfg.knowledge:
                prior = getattr(self, f"{k}_embeddings").linear1
                parts.append(alpha * prior(getattr(self, f"{k}_knowledge")[kid].to(parts[0].dtype)))
        return torch.cat(parts, -1)

    def forward(self, input_ids: torch.Tensor, values: torch.Tensor, species: torch.Tensor,
                position_ids: torch.Tensor, alpha: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Embedding-LayerNorm output of gene rows (any leading shape; ``species`` given per row)."""
        ce = self.concat_embeddings
        if self.cache_gene_table and not self.training and not torch.is_grad_enabled():
            x = self._cat_fc_cached(input_ids, values, species, alpha)
            x = ce.cat_proj(ce.cat_gelu(ce.cat_ln(x)))
        else:
            x = ce(self.concat_input(input_ids, values, species, alpha))
        x = x + self.position_embeddings(position_ids) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)

    # ------------------------------------------------------------------ inference cache
    def invalidate_gene_table(self) -> None:
        """Drop the cached gene table (needed only after editing weights through ``.data``, which
        bypasses the version counters the cache is keyed on)."""
        self._gene_table = None

    def _cache_key(self, alpha: torch.Tensor | float) -> tuple:
        ts = [self.word_embeddings.weight, self.concat_embeddings.cat_fc.weight, self.concat_embeddings.cat_fc.bias]
        if self.gcfg.knowledge:
            ts.append(self.homologous_index)
        for k in self.gcfg.knowledge:
            lin = getattr(self, f"{k}_embeddings").linear1
            ts += [getattr(self, f"{k}_knowledge"), lin.weight, lin.bias]
        return (float(alpha), *((t.data_ptr(), t._version, t.dtype, t.device) for t in ts))

    def _cat_fc_cached(self, input_ids: torch.Tensor, values: torch.Tensor, species: torch.Tensor,
                       alpha: torch.Tensor | float) -> torch.Tensor:
        """``cat_fc(concat_input(...))`` from the per-gene table (filled here for genes not seen yet)."""
        vocab = self.word_embeddings.num_embeddings
        key = self._cache_key(alpha)
        tab = self._gene_table
        if tab is None or tab.key != key:
            w = self.word_embeddings.weight
            n_species = 2 if self.gcfg.knowledge else 1  # without knowledge the species changes nothing here
            with torch.inference_mode(mode=False):  # plain tensors: filled in place under no_grad or inference mode
                # empty: the pages of genes never seen are never touched
                rows = torch.empty(n_species * vocab, w.shape[1], dtype=w.dtype, device=w.device)
                filled = torch.zeros(n_species * vocab, dtype=torch.bool, device=w.device)
            tab = self._gene_table = _GeneTable(key, rows, filled)
        idx = input_ids.long()
        if tab.rows.shape[0] > vocab:
            idx = idx + species.long() * vocab
        need = torch.unique(idx[~tab.filled[idx]])
        if need.numel():
            tab.rows[need] = self._gene_part(need % vocab, need // vocab, alpha)
            tab.filled[need] = True
        x = tab.rows[idx]
        if self.gcfg.use_values:
            w_value = self.concat_embeddings.cat_fc.weight[:, self.word_embeddings.embedding_dim]
            x = torch.addcmul(x, values.to(x.dtype).unsqueeze(-1), w_value)
        return x

    def _gene_part(self, genes: torch.Tensor, species: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
        """``cat_fc`` of ``[word | 0 | priors]`` for (gene, species) pairs, in the parameters' dtype."""
        fc = self.concat_embeddings.cat_fc
        h = self.word_embeddings.embedding_dim
        with torch.autocast(genes.device.type, enabled=False):  # the table serves every later call: full precision
            out = F.linear(self.word_embeddings.weight[genes], fc.weight[:, :h], fc.bias)
            if not self.gcfg.knowledge:
                return out
            kid = torch.where(species == 1, self.homologous_index[genes], genes)
            off = h + int(self.gcfg.use_values)
            for j, k in enumerate(self.gcfg.knowledge):
                prior = getattr(self, f"{k}_embeddings").linear1
                p = alpha * prior(getattr(self, f"{k}_knowledge")[kid].to(out.dtype))
                out = out + F.linear(p, fc.weight[:, off + j * h: off + (j + 1) * h])
        return out
