"""Join the outputs of ``scfm tokenize --shard K/N`` jobs into one token dataset.

Shard runs already number their files by their index in the full input list, so their Parquet shards
keep their names and contents: they are hard-linked (copied only across file systems), never
re-encoded. The packed store is concatenated in (file, row) order and the manifest is rebuilt, so the
result equals a single run's output cell for cell, with the same config (and config hash).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import StoreError, UsageError
from ._atomic import _atomic_write_text
from .packed import OPTIONAL_PACKED, packed_appenders
from .reader import read_manifest
from .schema import MANIFEST, META_DIR, PACKED_DIR
from .writer import _check_replaceable, _config_diff, config_hash

#: config entries that differ between the shard runs of one corpus (everything else must be equal)
_PER_SHARD = ("shard", "input_fingerprints")
_SUMMED = ("n_cells_in", "n_empty", "n_filtered", "n_at_max_len", "counts_total", "counts_matched",
           "n_qc_dropped")


def _common_config(dirs: Sequence[Path], mans: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The shared config of the shard runs; refuses plain runs and runs with other options."""
    for d, m in zip(dirs, mans):
        if "shard" not in m.get("config", {}):
            msg = f"{d}: not the output of a `scfm tokenize --shard K/N` run; only shard outputs can be merged"
            raise UsageError(msg)
    base = {k: v for k, v in mans[0]["config"].items() if k not in _PER_SHARD}
    for d, m in zip(dirs[1:], mans[1:]):
        cfg = {k: v for k, v in m["config"].items() if k not in _PER_SHARD}
        if json.dumps(cfg, sort_keys=True, default=str) != json.dumps(base, sort_keys=True, default=str):
            msg = (f"{d}: made with other inputs, options or dictionaries than {dirs[0]} "
                   f"({_config_diff(base, cfg)}); rerun that shard with the same command line")
            raise UsageError(msg)
    return base


def _check_shards(dirs: Sequence[Path], mans: Sequence[dict[str, Any]]) -> int:
    """Every shard K of N exactly once; returns N."""
    ns = {m["config"]["shard"]["n"] for m in mans}
    if len(ns) != 1:
        msg = f"the outputs come from splits into different numbers of shards ({sorted(ns)}); merge one split"
        raise UsageError(msg)
    n = ns.pop()
    seen: dict[int, Path] = {}
    for d, m in zip(dirs, mans):
        k = m["config"]["shard"]["k"]
        if k in seen:
            msg = f"{d}: shard {k}/{n} given twice (also {seen[k]})"
            raise UsageError(msg)
        seen[k] = d
    missing = [k for k in range(1, n + 1) if k not in seen]
    if missing:
        msg = (f"shard(s) {', '.join(f'{k}/{n}' for k in missing)} missing; pass all {n} shard outputs "
               "(finish or rerun the missing jobs first)")
        raise UsageError(msg)
    return n


def _link(src: Path, dst: Path) -> None:
    """Hard link (no second copy of the data); a plain copy across file systems."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(src, dst)


def _load_packed(d: Path, name: str) -> np.ndarray:
    try:
        return np.load(d / PACKED_DIR / f"{name}.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        msg = (f"{d / PACKED_DIR / name}.npy: missing or damaged ({e}); rebuild that shard output with the same "
               "`scfm tokenize ... --shard K/N --resume` after deleting its __scfm__/packed")
        raise StoreError(msg) from None


def _concat_packed(dirs: Sequence[Path], mans: Sequence[dict[str, Any]], out: Path, *,
                   n_inputs: int) -> tuple[int, int, str, list[str]]:
    """Concatenate the packed stores in file order (streaming, bounded by one file's cells), with the
    optional arrays (GeneCompass values, species) they carry."""
    dtypes = {m["packed"]["dtype"] for m in mans}
    if len(dtypes) != 1:
        msg = f"the outputs' packed stores have different token dtypes {sorted(dtypes)}; re-tokenize them alike"
        raise StoreError(msg)
    dtype = np.dtype(dtypes.pop())
    optionals = {tuple(m["packed"].get("optional") or []) for m in mans}
    if len(optionals) != 1:
        msg = (f"the outputs' packed stores carry different optional arrays {sorted(optionals)}; "
               "re-tokenize them alike")
        raise StoreError(msg)
    optional = [name for name in optionals.pop() if name in OPTIONAL_PACKED]
    stores = [{k: _load_packed(d, k) for k in ("tokens", "offsets", "cell_index", "file_index", *optional)}
              for d in dirs]
    owner = {fi: j for j, m in enumerate(mans) for fi in m["config"]["shard"]["files"]}
    n_cells = sum(int(s["offsets"].shape[0]) - 1 for s in stores)
    n_tokens = sum(int(s["tokens"].shape[0]) for s in stores)
    outs = packed_appenders(out, dtype, n_cells=n_cells, n_tokens=n_tokens, optional=optional)
    ok = False
    try:
        outs["offsets"].write(np.zeros(1, dtype=np.int64))
        t = 0
        for fi in range(n_inputs):
            s = stores[owner[fi]]
            # a store holds its files in order, so one file's cells are one contiguous range
            a, b = np.searchsorted(s["file_index"], [fi, fi + 1])
            lo, hi = int(s["offsets"][a]), int(s["offsets"][b])
            outs["tokens"].write(np.asarray(s["tokens"][lo:hi]))
            outs["offsets"].write(t + (np.asarray(s["offsets"][a + 1:b + 1]) - lo))
            outs["cell_index"].write(np.asarray(s["cell_index"][a:b]))
            outs["file_index"].write(np.asarray(s["file_index"][a:b]))
            for name in optional:
                lo_, hi_ = (lo, hi) if OPTIONAL_PACKED[name][0] == "token" else (a, b)
                outs[name].write(np.asarray(s[name][lo_:hi_]))
            t += hi - lo
        ok = True
    finally:
        for o in outs.values():
            o.close(check=ok)
    return n_cells, n_tokens, dtype.name, optional


def merge_token_datasets(parts: Sequence[str | Path], out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Join the outputs of ``tokenize_corpus(..., shard="K/N")`` for K = 1..N into one dataset.

    Parameters
    ----------
    parts
        The N complete shard output directories, in any order.
    out
        The merged dataset directory (new or empty; or replaced with ``overwrite``). It must be on the
        same file system as ``parts`` for the Parquet shards to be hard-linked rather than copied.
    overwrite
        Replace an existing ``out``.

    Returns
    -------
    dict
        The merged manifest: equal to a single run's over all inputs (config, shards, counts), plus
        ``merged_from``.

    Raises
    ------
    UsageError
        When an output is not a shard output, was made with other inputs, options or dictionaries, or a
        shard is missing or given twice.
    StoreError
        When an output is unfinished or damaged, or ``out`` holds something else.
    """
    dirs = [Path(p) for p in parts]
    if not dirs:
        msg = "no shard outputs given to merge"
        raise UsageError(msg)
    mans = [read_manifest(d) for d in dirs]
    config = _common_config(dirs, mans)
    _check_shards(dirs, mans)
    n_inputs = len(config["inputs"])
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            msg = f"{out}: exists and is not empty; pass --overwrite to replace it or a new OUT"
            raise StoreError(msg)
        _check_replaceable(out)
    tmp = out.with_name(f".{out.name}.merge-{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / PACKED_DIR).mkdir(parents=True)
    try:
        fingerprints: list[Any] = [None] * n_inputs
        inputs: list[Any] = [None] * n_inputs
        gene_match: list[Any] = [None] * n_inputs
        qc_files: list[Any] = [None] * n_inputs
        shards: list[dict[str, Any]] = []
        for d, m in zip(dirs, mans):
            files = m["config"]["shard"]["files"]
            for j, fi in enumerate(files):
                fingerprints[fi] = m["config"]["input_fingerprints"][j]
                inputs[fi], gene_match[fi] = m["inputs"][j], m["gene_match"][j]
                if m.get("qc"):
                    qc_files[fi] = m["qc"]["files"][j]
            for rec in m["shards"]:
                src = d / rec["file"]
                if not src.is_file():
                    msg = f"{src}: recorded in {d / MANIFEST} but missing; rerun that shard job with --resume"
                    raise StoreError(msg)
                _link(src, tmp / rec["file"])
                shards.append(rec)
        n_cells, n_tokens, dtype, optional = _concat_packed(dirs, mans, tmp / PACKED_DIR, n_inputs=n_inputs)
        shards.sort(key=lambda s: (s["file_index"], s["start"]))
        summary = {k: sum(s.get(k, 0) for s in shards) for k in _SUMMED}
        summary["fraction_counts_matched"] = summary["counts_matched"] / max(summary["counts_total"], 1e-300)
        summary["seconds"] = sum(m.get("summary", {}).get("seconds", 0.0) for m in mans)
        config = {**config, "input_fingerprints": fingerprints}
        now = time.time()
        manifest = {**{k: v for k, v in mans[0].items() if k not in ("file_indexes",)},
                    "status": "complete", "config_hash": config_hash(config), "config": config,
                    "shards": shards, "inputs": inputs, "gene_match": gene_match, "n_cells": n_cells,
                    "n_tokens": n_tokens, "packed": {"dir": PACKED_DIR, "dtype": dtype, "optional": optional},
                    "summary": summary, "created": now, "merged_from": [str(d.resolve()) for d in dirs]}
        if mans[0].get("qc"):  # per-file QC reports, by global file index like the inputs
            manifest["qc"] = {**mans[0]["qc"], "files": qc_files}
        if n_cells != sum(s["n_cells_written"] for s in shards) or n_tokens != sum(s["n_tokens"] for s in shards):
            msg = f"the packed stores of {', '.join(map(str, dirs))} do not match their manifests; re-tokenize"
            raise StoreError(msg)
        manifest["updated"] = now
        (tmp / META_DIR).mkdir(exist_ok=True)
        _atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, default=str))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
