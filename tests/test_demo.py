"""The README's demo runs end to end (small model and short cells so it is quick)."""

from __future__ import annotations

import json

import pytest


def test_demo_end_to_end(tmp_path, pbmc_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("SCFM_FAST_TRITON", "0")
    from scfm_fast.cli import main
    from scfm_fast.demo import main as demo_main
    from scfm_fast.model.bert import BertEncoderModel
    from scfm_fast.model.checkpoint import save_encoder
    from scfm_fast.model.config import EncoderConfig

    assert main(["tokenize", str(pbmc_path), "--out", str(tmp_path / "tokens"), "--max-len", "64"]) == 0
    cfg = EncoderConfig(vocab_size=25_426, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64)
    save_encoder(BertEncoderModel(cfg), tmp_path / "ckpt")
    assert demo_main([str(tmp_path), "--model", str(tmp_path / "ckpt"), "--perturb-cells", "3"]) == 0
    for f in ("tokens_summary.png", "embeddings_pca.png", "gene_stats.png", "perturbations.parquet",
              "cell_embeddings.parquet"):
        assert (tmp_path / f).stat().st_size > 0
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["exact_vs_reference_max_abs_dcos"] < 1e-5 and summary["perturbations"] > 0
