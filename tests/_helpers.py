"""Test helpers: the low-precision tolerance rule and tiny model builders."""

from __future__ import annotations

import torch


def assert_close_to_baseline(out: torch.Tensor, ref_fp32: torch.Tensor, baseline_lowp: torch.Tensor, *,
                             factor: float = 2.0, atol: float = 1e-6) -> None:
    """flash-attn's rule: ``out``'s error vs fp32 is at most ``factor`` x the baseline's (+ ``atol``).

    ``baseline_lowp`` is the reference implementation run in the same low precision, so the
    tolerance comes from what that precision can do, not from a hand-picked constant.
    """
    err = (out.float() - ref_fp32.float()).abs().max().item()
    base = (baseline_lowp.float() - ref_fp32.float()).abs().max().item()
    assert err <= factor * base + atol, f"max error {err:.3g} > {factor} x baseline {base:.3g} + {atol:g}"


def tiny_config(*, act: str = "relu", layers: int = 2, hidden: int = 48, heads: int = 3, inter: int = 80,
                vocab: int = 97, positions: int = 64):
    """A small BERT config with awkward sizes (hidden not a power of two, head_dim 16)."""
    from scfm_fast.model.config import EncoderConfig

    return EncoderConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=inter, hidden_act=act, max_position_embeddings=positions)


def init_like_bert(model: torch.nn.Module, *, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Random weights large enough that layers matter (PyTorch's default init is nearly linear here)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model
