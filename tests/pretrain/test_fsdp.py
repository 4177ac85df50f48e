"""``--shard fsdp`` (FSDP2 over gloo on CPU) against plain data parallelism, and its resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.pretrain._store import random_cells, write_dictionary, write_store

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="gloo backend unavailable")


def _torchrun(store: Path, out: Path, flags: list[str], *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCFM_FAST_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scfm_fast", "pretrain", str(store), "--out", str(out), *flags, *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if k.endswith("attention.self.key.bias"):
            # zero gradient in exact arithmetic (softmax is shift-invariant): AdamW turns the roundoff of the
            # summation order into steps of its own, so both runs only keep it negligible (init 0)
            assert float(a[k].abs().max()) < 1e-5 and float(b[k].abs().max()) < 1e-5, k
            continue
        scale = float(b[k].abs().max()) or 1.0
        assert float((a[k] - b[k]).abs().max()) / scale <= tol, (k, float((a[k] - b[k]).abs().max()) / scale)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A DDP run and an FSDP run (6 steps, checkpoints at 3 and 6) on the same data and options."""
    tmp = tmp_path_factory.mktemp("fsdp")
    d = write_dictionary(tmp / "dict.pkl", 64)
    # 70 cells, 6 held out: the last step of each epoch leaves a rank an empty micro-batch
    store = write_store(tmp / "tokens", random_cells(70, vocab_size=64, lo=4, hi=30), dictionary=d)
    cfg = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 32, "hidden_act": "silu", "max_position_embeddings": 32}
    (tmp / "config.json").write_text(json.dumps(cfg))
    flags = ["--config", str(tmp / "config.json"), "--token-dictionary", str(d), "--batch-tokens", "64",
             "--global-batch-tokens", "256", "--max-steps", "6", "--save-every", "3", "--dtype", "float32",
             "--lr", "3e-3", "--warmup", "2", "--seed", "3", "--deterministic", "--eval-fraction", "0.1",
             "--eval-every", "3"]
    _torchrun(store, tmp / "ddp", flags)
    _torchrun(store, tmp / "fsdp", flags, "--shard", "fsdp")
    return tmp, store, flags


def test_fsdp_reaches_the_ddp_weights(runs):
    tmp, _, _ = runs
    assert json.loads((tmp / "fsdp" / "run.json").read_text())["shard"] == "fsdp"
    for step in (3, 6):
        a, b = _weights(tmp / "fsdp" / f"checkpoint-{step}"), _weights(tmp / "ddp" / f"checkpoint-{step}")
        assert len(a) > 10
        _assert_close(a, b, 1e-6)
    # the weights moved (the comparison is not between two untouched initialisations)
    assert float((_weights(tmp / "fsdp" / "checkpoint-6")["cls.predictions.bias"]).abs().max()) > 1e-3
    evals = [json.loads(x).get("eval_loss") for x in (tmp / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x).get("eval_loss") for x in (tmp / "ddp" / "metrics.jsonl").read_text().splitlines()]
    got = [e for e in evals if e is not None]
    assert len(got) == 2
    assert got == pytest.approx([e for e in ref if e is not None], rel=1e-6)


def test_fsdp_checkpoint_loads_in_transformers(runs):
    transformers = pytest.importorskip("transformers")
    tmp, _, _ = runs
    ckpt = tmp / "fsdp" / "checkpoint-6"
    hf = transformers.BertForMaskedLM.from_pretrained(str(ckpt))
    w = _weights(ckpt)
    assert torch.equal(hf.bert.embeddings.word_embeddings.weight, w["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(hf.cls.predictions.decoder.weight, hf.bert.embeddings.word_embeddings.weight)  # tied


def test_fsdp_resume_matches_the_uninterrupted_run(runs):
    tmp, store, flags = runs
    out = tmp / "fsdp_resumed"
    shutil.copytree(tmp / "fsdp", out)
    shutil.rmtree(out / "checkpoint-6")  # as if killed between steps 3 and 6
    _torchrun(store, out, flags, "--shard", "fsdp", "--resume")
    # the optimiser state came back sharded: without it AdamW's moments would restart and the weights differ by
    # ~lr. Usually bit-exact; one run of several differed by one float32 ulp in one tensor, hence 1e-6.
    _assert_close(_weights(out / "checkpoint-6"), _weights(tmp / "fsdp" / "checkpoint-6"), 1e-6)


def test_fsdp_resume_of_a_ddp_run_is_refused(runs, tmp_path):
    tmp, store, flags = runs
    out = tmp_path / "ddp_copy"
    shutil.copytree(tmp / "ddp", out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCFM_FAST_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scfm_fast", "pretrain", str(store), "--out", str(out), *flags, "--shard", "fsdp", "--resume"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "shard" in r.stderr


def test_fsdp_in_one_process_is_refused(runs, tmp_path):
    tmp, store, flags = runs
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCFM_FAST_PROGRESS": "0"}
    r = subprocess.run([sys.executable, "-m", "scfm_fast", "pretrain", str(store), "--out", str(tmp_path / "one"),
                        *flags, "--shard", "fsdp"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "torchrun" in r.stderr


def test_fsdp_bf16_mixed_precision_tracks_float32(runs, tmp_path):
    """bf16 parameter copies with float32 reduction and master weights: float32 checkpoints near the fp32 run's."""
    tmp, store, flags = runs
    out = tmp_path / "bf16"
    _torchrun(store, out, [*flags, "--shard", "fsdp", "--dtype", "bfloat16", "--max-steps", "3"])
    a, b = _weights(out / "checkpoint-3"), _weights(tmp / "fsdp" / "checkpoint-3")
    assert all(v.dtype == torch.float32 for v in a.values())  # master weights stay float32
    init_scale = 0.02  # BERT's initializer range: weights moved by ~lr per step, bf16 noise is far smaller
    # Adam normalises each weight's step: where the gradient is ~0 (key biases analytically; rows of the
    # positions only a cell or two reach) bf16 noise decides its sign, so single entries there can move up to
    # lr per step apart whatever the head's float order; those tensors are held to an RMS bound instead
    noisy = ("key.bias", "position_embeddings.weight")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a if not k.endswith(noisy))
    assert 0 < worst < 0.1 * init_scale  # 0 would mean the bf16 compute never happened (same run as fp32)
    rms = max(float((a[k] - b[k]).square().mean().sqrt()) for k in a if k.endswith(noisy))
    assert rms < 0.05 * init_scale
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x)["loss"] for x in (tmp / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] == pytest.approx(ref[0], rel=1e-2)
