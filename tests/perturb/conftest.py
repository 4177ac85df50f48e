"""Fixtures of the perturbation tests: a tiny random BERT encoder and V1 / V2 token layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfm_fast.model.bert import BertEncoderModel
from scfm_fast.model.config import EncoderConfig

PAD, MASK, CLS, EOS = 0, 1, 2, 3
SPECIAL = [PAD, MASK, CLS, EOS]
VOCAB = 200


def tiny_model(seed: int = 0, *, std: float = 0.3) -> BertEncoderModel:
    """hidden 48, 3 heads, 3 layers, intermediate 80: a non-power-of-two random encoder.

    A large init std makes perturbation effects big enough to rank (default BERT init gives ~1e-7).
    """
    g = torch.Generator().manual_seed(seed)
    cfg = EncoderConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                        intermediate_size=80, max_position_embeddings=64, hidden_act="gelu")
    m = BertEncoderModel(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "LayerNorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return m.eval()


def make_cells(lengths, *, v2: bool = False, seed: int = 0) -> list[np.ndarray]:
    """Cells of distinct gene tokens (ids 4..VOCAB-1); V2 adds <cls> first and <eos> last."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        genes = rng.choice(np.arange(4, VOCAB), size=n, replace=False)
        out.append(np.concatenate([[CLS], genes, [EOS]]) if v2 else genes)
    return [c.astype(np.int64) for c in out]


@pytest.fixture(scope="module")
def model() -> BertEncoderModel:
    return tiny_model()


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("SCFM_FAST_PROGRESS", "0")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """``tiny_model()`` saved as a Hugging Face checkpoint directory (``bert.`` prefix, safetensors)."""
    import json

    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("ckpt")
    m = tiny_model()
    (d / "config.json").write_text(json.dumps(m.config.to_hf_dict()))
    save_file({f"bert.{k}": v.contiguous() for k, v in m.state_dict().items()}, str(d / "model.safetensors"))
    return d


def run_cli(token_dir, ckpt, out, *extra, cells_per_shard: int = 3) -> int:
    """``scfm perturb`` on the test layout (special tokens 0-3, small batches); returns the exit code."""
    from scfm_fast.cli import main

    return main(["perturb", str(token_dir), "--model", str(ckpt), "--out", str(out), "--cells-per-shard",
                 str(cells_per_shard), "--special-tokens", ",".join(map(str, SPECIAL)), "--batch-tokens", "64",
                 *extra])


def finish_token_dir(d, config: dict | None = None):
    """Mark a folder of token Parquet files a finished token dataset (the manifest ``open_cells`` reads)."""
    import json

    (d / "__scfm__").mkdir(exist_ok=True)
    (d / "__scfm__" / "manifest.json").write_text(json.dumps({"status": "complete", "config": config or {}}))
    return d
