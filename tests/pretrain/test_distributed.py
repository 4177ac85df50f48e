"""torchrun data parallelism (gloo on CPU) against one process accumulating the same micro-batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.pretrain._store import random_cells, write_dictionary, write_store

REPO = Path(__file__).resolve().parents[2]


def test_two_gloo_processes_match_one_process_accumulating_two_micro_batches(tmp_path):
    pytest.importorskip("torch.distributed.run")
    if not torch.distributed.is_gloo_available():
        pytest.skip("gloo backend unavailable")
    d = write_dictionary(tmp_path / "dict.pkl", 64)
    store = write_store(tmp_path / "tokens", random_cells(60, vocab_size=64, lo=4, hi=30), dictionary=d)
    cfg = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 32, "hidden_act": "relu", "max_position_embeddings": 32}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    flags = ["--config", str(tmp_path / "config.json"), "--token-dictionary", str(d), "--batch-tokens", "64",
             "--global-batch-tokens", "128", "--max-steps", "10", "--save-every", "10", "--dtype", "float32",
             "--lr", "3e-3", "--warmup", "0", "--seed", "2", "--deterministic"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCFM_FAST_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scfm_fast", "pretrain", str(store), "--out", str(tmp_path / "ddp"), *flags]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2 and run["micro_batches_per_step"] == 2

    one = subprocess.run([sys.executable, "-m", "scfm_fast", "pretrain", str(store), "--out", str(tmp_path / "one"),
                          *flags], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads((tmp_path / "one" / "run.json").read_text())["micro_batches_per_step"] == 2

    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ddp" / "checkpoint-10" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "checkpoint-10" / "model.safetensors"))
    moved = 0
    for k in a:
        scale = float(b[k].abs().max()) or 1.0
        assert float((a[k] - b[k]).abs().max()) / scale <= 1e-6, k
        moved += 1
    assert moved > 10
