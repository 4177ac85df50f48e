"""The training loop end to end on tiny models: checkpoints, resume after SIGKILL, refusals, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import scfm_fast
from scfm_fast._errors import InputFileError, UsageError
from scfm_fast.cli import main as cli_main
from scfm_fast.pretrain import NonFiniteLossError
from scfm_fast.pretrain import pretrain_model as pretrain
from tests.pretrain._store import random_cells, write_dictionary, write_store

V = 64
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def data(tmp_path):
    d = write_dictionary(tmp_path / "dict.pkl", V)
    store = write_store(tmp_path / "tokens", random_cells(80, vocab_size=V, lo=4, hi=30), dictionary=d)
    cfg = {"vocab_size": V, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 32, "hidden_act": "relu", "max_position_embeddings": 32}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return {"tokens": str(store), "dict": str(d), "config": str(tmp_path / "config.json"), "tmp": tmp_path}


def _opts(data, **kw):
    base = dict(config=data["config"], token_dictionary=data["dict"], batch_tokens=96, dtype="float32",
                lr=3e-3, warmup=0, seed=1, deterministic=True, progress=False, log_every=1)
    base.update(kw)
    return base


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def test_run_writes_checkpoints_that_hf_loads_and_metrics(data):
    transformers = pytest.importorskip("transformers")
    out = data["tmp"] / "run"
    res = scfm_fast.pretrain_model([data["tokens"]], out=out, **_opts(data, max_steps=4, save_every=2,
                                                                   eval_fraction=0.1, eval_every=2))
    assert res["status"] == "complete" and res["step"] == 4 and np.isfinite(res["eval_loss"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "loss.png").stat().st_size > 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for key in ("loss", "masked_accuracy", "lr", "grad_norm", "tokens_per_s", "cells_per_s", "data_wait_pct",
                "peak_memory_gb", "mfu"):
        assert all(key in r for r in recs), key
    assert "eval_loss" in recs[1] and "eval_loss" in recs[3]

    # the checkpoint is a BertForMaskedLM whose MLM logits equal our encoder + head on the same cell
    ckpt = out / "checkpoint-4"
    hf, info = transformers.BertForMaskedLM.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    from scfm_fast.model.checkpoint import load_encoder
    from scfm_fast.model.heads import MLMHead
    from scfm_fast.pretrain.build import load_weights

    enc = load_encoder(ckpt)
    head = MLMHead(enc.config, tied_to=enc.embeddings.word_embeddings)
    load_weights(enc, head, ckpt)
    ids = torch.tensor([[5, 9, 2, 17, 33, 8]])
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids).logits[0]
        ours = head(enc.forward_reference(ids)[0])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_resume_after_sigkill_matches_an_uninterrupted_run(data):
    k = 3
    full = pretrain([data["tokens"]], out=data["tmp"] / "full", **_opts(data, max_steps=2 * k, save_every=k))
    run = data["tmp"] / "killed"
    cmd = [sys.executable, "-m", "scfm_fast", "pretrain", data["tokens"], "--out", str(run), "--config",
           data["config"], "--token-dictionary", data["dict"], "--batch-tokens", "96", "--dtype", "float32",
           "--lr", "3e-3", "--warmup", "0", "--seed", "1", "--deterministic", "--max-steps", str(2 * k),
           "--save-every", str(k), "--log-every", "1"]
    # CPU sums depend on the intra-op thread count: the killed run uses this process's (another test may
    # have changed it), as a --deterministic resume restores the count a run was started with
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCFM_FAST_PROGRESS": "0",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (run / f"checkpoint-{k}").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / f"checkpoint-{k}").exists(), proc.stderr.read().decode()[-2000:]
    res = pretrain([data["tokens"]], out=run, **_opts(data, max_steps=2 * k, save_every=k, resume=True))
    assert res["step"] == 2 * k and full["step"] == 2 * k
    a, b = _weights(run / f"checkpoint-{2 * k}"), _weights(data["tmp"] / "full" / f"checkpoint-{2 * k}")
    for name in a:
        assert torch.equal(a[name], b[name]) or float((a[name] - b[name]).abs().max()) <= 1e-7, name
    # metrics past the resumed checkpoint were dropped before the resumed run appended its own
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 2 * k


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(data):
    run = data["tmp"] / "term"
    cmd = [sys.executable, "-m", "scfm_fast", "pretrain", data["tokens"], "--out", str(run), "--config",
           data["config"], "--token-dictionary", data["dict"], "--batch-tokens", "96", "--dtype", "float32",
           "--max-steps", "100000", "--save-every", "100000", "--log-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCFM_FAST_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()[-2000:]
    res = json.loads(err.decode().strip().splitlines()[-1])
    assert res["status"] == "interrupted" and res["last_checkpoint"].endswith(f"checkpoint-{res['step']}")
    assert (run / f"checkpoint-{res['step']}" / "trainer_state.pt").exists()


def test_refusals_before_the_first_step(data, tmp_path):
    with pytest.raises(UsageError, match=r"vocabulary has 100 tokens but the dataset's token dictionary has 64"):
        cfg = json.loads(Path(data["config"]).read_text())
        (tmp_path / "big.json").write_text(json.dumps({**cfg, "vocab_size": 100}))
        pretrain([data["tokens"]], out=tmp_path / "r0", **_opts(data, config=str(tmp_path / "big.json"), max_steps=1))
    with pytest.raises(InputFileError, match="does not bundle.*--token-dictionary"):
        pretrain([data["tokens"]], out=tmp_path / "r1", **_opts(data, token_dictionary=None, max_steps=1))
    with pytest.raises(UsageError, match="--shard fsdp shards over processes: start it with torchrun"):
        pretrain([data["tokens"]], out=tmp_path / "r2", **_opts(data, shard="fsdp", max_steps=1))
    with pytest.raises(UsageError, match=r"cell \d+ has \d+ tokens but the model has 4 positions"):
        cfg = json.loads(Path(data["config"]).read_text())
        (tmp_path / "short.json").write_text(json.dumps({**cfg, "max_position_embeddings": 4}))
        pretrain([data["tokens"]], out=tmp_path / "r3", **_opts(data, config=str(tmp_path / "short.json"),
                                                                 max_steps=1))
    out = tmp_path / "run"
    pretrain([data["tokens"]], out=out, **_opts(data, max_steps=1))
    with pytest.raises(UsageError, match="holds a pretraining run already; pass --resume"):
        pretrain([data["tokens"]], out=out, **_opts(data, max_steps=1))
    with pytest.raises(UsageError, match="another config or dataset.*'lr'"):
        pretrain([data["tokens"]], out=out, **_opts(data, max_steps=1, lr=1e-2, resume=True))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(UsageError, match="not a pretraining run directory"):
        pretrain([data["tokens"]], out=tmp_path / "other", **_opts(data, max_steps=1))


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(data):
    out = data["tmp"] / "nan"
    with pytest.raises(NonFiniteLossError, match=r"step \d+: the loss is (nan|inf).*checkpoint-1"):
        pretrain([data["tokens"]], out=out, **_opts(data, max_steps=20, save_every=1, lr=1e30, grad_clip=1e30))
    ckpts = sorted(out.glob("checkpoint-*"))
    assert ckpts and not list(out.glob(".checkpoint-*"))


def test_cli(data):
    out = data["tmp"] / "cli"
    rc = cli_main(["pretrain", data["tokens"], "--out", str(out), "--config", data["config"], "--token-dictionary",
                   data["dict"], "--max-steps", "2", "--batch-tokens", "64", "--global-batch-cells", "6",
                   "--dtype", "bfloat16", "--grad-checkpointing", "--protect-special", "--save-every", "2"])
    assert rc == 0 and (out / "checkpoint-2" / "model.safetensors").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["micro_batches_per_step"] >= 2  # 6 cells of ~17 tokens > one 64-token micro-batch
