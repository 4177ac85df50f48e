"""The run directory: its identity (``run.json``) and atomic, resumable checkpoints.

``RUN_DIR/checkpoint-STEP/`` holds ``config.json`` + ``model.safetensors`` (a ``BertForMaskedLM``
checkpoint that ``scfm embed`` / ``scfm perturb`` read directly) and ``trainer_state.pt`` (optimiser,
scheduler, data cursor, RNG states). It is written as a hidden temporary directory and renamed into
place, so a ``checkpoint-STEP`` that exists is complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._errors import UsageError
from .._lock import DEFAULT_LOCK
from ..model.checkpoint import save_encoder

RUN_FILE = "run.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def prepare_run_dir(out: Path, identity: dict[str, Any], *, resume: bool) -> Path | None:
    """Create ``out`` for a new run, or check that it holds this run when resuming.

    Returns the latest complete checkpoint to resume from (``None`` for a fresh start). Raises
    :class:`UsageError` for an ``--out`` that holds another run or unrelated files.
    """
    run_file = out / RUN_FILE
    if run_file.exists():
        if not resume:
            msg = (f"{out}: holds a pretraining run already; pass --resume to continue it, or choose another --out")
            raise UsageError(msg)
        old = json.loads(run_file.read_text())
        diff = [f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in sorted(set(old) | set(identity))
                if old.get(k) != identity.get(k)]
        if diff:
            msg = f"{out}: --resume with another config or dataset than the run there; differs: " + "; ".join(diff)
            raise UsageError(msg)
        return latest_checkpoint(out)
    # the output lock `scfm pretrain` holds (scfm_fast._lock) is the one file a new run's --out may hold
    if out.exists() and any(p.name != DEFAULT_LOCK for p in out.iterdir()):
        msg = f"{out}: exists and is not a pretraining run directory (no {RUN_FILE}); choose an empty or new --out"
        raise UsageError(msg)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(identity, indent=1, default=str))
    os.replace(tmp, run_file)
    return None


def latest_checkpoint(out: Path) -> Path | None:
    """The complete ``checkpoint-STEP`` with the highest step (``None`` if there is none)."""
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def save_checkpoint(out: Path, step: int, *, model, head, trainer: dict[str, Any]) -> Path:
    """Write ``out/checkpoint-STEP`` atomically (temporary directory, then one rename)."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "gcfg"):  # GeneCompass: its own layout (config.json + pytorch_model.bin, heads inside)
        from ..model.genecompass_checkpoint import save_genecompass

        save_genecompass(model, tmp)
    else:
        save_encoder(model, tmp, mlm_head=head)
    # the CPU's intra-op thread count fixes its reduction order: a --deterministic resume restores it
    state = dict(trainer, cpu_threads=torch.get_num_threads(), rng={"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                               "python": random.getstate(),
                               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})
    torch.save(state, tmp / "trainer_state.pt")
    for f in tmp.iterdir():  # the rename below must not publish data still in the page cache only
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """``trainer_state.pt`` of a checkpoint, RNG states restored."""
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
