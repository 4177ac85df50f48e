"""Real mouse cells end to end: medians -> tokenize -> pretrain a tiny SiLU model -> embed the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scfm_fast.cli import main as cli_main
from scfm_fast.pretrain import pretrain_model as pretrain


def test_pretrain_on_real_mouse_cells_then_embed(shared_dir, tmp_path):
    src = shared_dir / "data" / "mouse" / "scvelo_pancreas_100obs.h5ad"
    if not src.exists():
        pytest.skip(f"{src} not found")
    assert cli_main(["medians", str(src), "--out", str(tmp_path / "dict")]) == 0
    tok = tmp_path / "tokens"
    assert cli_main(["tokenize", str(src), "--out", str(tok), "--token-dictionary",
                     str(tmp_path / "dict" / "token_dictionary.pkl"), "--gene-median",
                     str(tmp_path / "dict" / "gene_median_dictionary.pkl"), "--gene-name-map", "none",
                     "--max-len", "48"]) == 0
    cfg = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
           "hidden_act": "silu", "max_position_embeddings": 48}  # vocabulary: the dataset's
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    res = pretrain([str(tok)], out=tmp_path / "run", config=str(tmp_path / "cfg.json"),
                   token_dictionary=str(tmp_path / "dict" / "token_dictionary.pkl"), max_steps=40,
                   batch_tokens=480, lr=3e-3, warmup=5, dtype="float32", eval_fraction=0.1, eval_every=20,
                   save_every=40, progress=False, log_every=1)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([r["loss"] for r in recs[:3]]), np.mean([r["loss"] for r in recs[-3:]])
    assert last < first - 0.5, (first, last)  # clearly below its start (ln V ~ 9.5 at step 1)
    assert np.isfinite(res["eval_loss"]) and res["eval_loss"] < first
    out = tmp_path / "emb"
    assert cli_main(["embed", str(tok), "--model", str(tmp_path / "run" / "checkpoint-40"), "--out", str(out),
                     "--device", "cpu"]) == 0
    emb = np.load(next(out.glob("*.npy")))
    assert emb.shape == (100, 32) and np.isfinite(emb).all()
