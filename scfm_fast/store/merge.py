"""Join the outputs of ``scfm tokenize --shard K/N`` jobs into one token dataset.

Shard runs already number their files by their index in the full input list, so their Parquet shards
keep their names and contents: they and the packed store's per-shard token segments are hard-linked
(copied only across file systems), never re-encoded. The per-cell packed arrays are concatenated in
(file, row) order and the manifest is rebuilt, so the result equals a single run's output cell for
cell, with the same config (and config hash).
"""

from __future__ import annotations

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
from .packed import OPTIONAL_PACKED, _NpyAppender, cell_appenders, npy_extent, packed_split
from .reader import read_manifest
from .schema import MANIFEST, META_DIR, PACKED_DIR, SEGMENTS
from .segments import link_or_copy, segment_file
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


def _load_packed(d: Path, name: str) -> np.ndarray:
    try:
        return np.load(d / PACKED_DIR / f"{name}.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        msg = (f"{d / PACKED_DIR / name}.npy: missing or damaged ({e}); rebuild that shard output with the same "
               "`scfm tokenize ... --shard K/N --resume` after deleting its __scfm__/packed")
        raise StoreError(msg) from None


def _file_segments(d: Path, man: dict[str, Any], fi: int, name: str, dtype: np.dtype, flat: np.ndarray | None,
                   lo: int, hi: int, out: Path) -> None:
    """Input file ``fi``'s segments of per-token array ``name`` in output ``d``, placed in ``out``: linked
    from a segmented store; cut per shard from a single-file store (format /1), tokens ``[lo, hi)``."""
    recs = sorted((r for r in man["shards"] if r["file_index"] == fi and int(r["n_tokens"]) > 0),
                  key=lambda r: r["start"])
    if sum(int(r["n_tokens"]) for r in recs) != hi - lo:
        msg = f"{d}: the packed store does not match its manifest's shards; rebuild it with --resume"
        raise StoreError(msg)
    t = lo
    for r in recs:
        n, dst = int(r["n_tokens"]), segment_file(out / name, r["file"])
        if flat is None:
            src = segment_file(d / PACKED_DIR / name, r["file"])
            try:
                got = npy_extent(src)
            except OSError as e:
                msg = (f"{src}: missing or damaged ({e}); rebuild that shard output with the same "
                       "`scfm tokenize ... --shard K/N --resume` after deleting its __scfm__/packed")
                raise StoreError(msg) from None
            if got[:2] != (dtype, n):
                msg = (f"{src}: holds {got[0]}[{got[1]}], its manifest record says {dtype}[{n}]; rebuild that "
                       "shard output with `--resume` after deleting its __scfm__/packed")
                raise StoreError(msg)
            link_or_copy(src, dst)
        else:
            seg = _NpyAppender(dst, dtype, n)
            seg.write(np.asarray(flat[t:t + n]))
            seg.close()
        t += n


def _concat_packed(dirs: Sequence[Path], mans: Sequence[dict[str, Any]], out: Path, *,
                   n_inputs: int) -> tuple[int, int, str, list[str]]:
    """Join the packed stores in file order, with the optional arrays (GeneCompass values, species) they
    carry: per-token segments are hard-linked (cut per shard from a single-file store), per-cell arrays
    concatenated (streaming, bounded by one file's cells)."""
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
    per_token, per_cell = packed_split(optional)
    segmented = [m["packed"].get("layout") == SEGMENTS for m in mans]
    stores = [{k: _load_packed(d, k) for k in ("offsets", "cell_index", "file_index", *per_cell,
                                               *([] if seg else per_token))}
              for d, seg in zip(dirs, segmented)]
    owner = {fi: j for j, m in enumerate(mans) for fi in m["config"]["shard"]["files"]}
    n_cells = sum(int(s["offsets"].shape[0]) - 1 for s in stores)
    n_tokens = sum(int(s["offsets"][-1]) for s in stores)
    outs = cell_appenders(out, n_cells=n_cells, optional=per_cell)
    for name in per_token:
        (out / name).mkdir()
    ok = False
    try:
        outs["offsets"].write(np.zeros(1, dtype=np.int64))
        t = 0
        for fi in range(n_inputs):
            j = owner[fi]
            s = stores[j]
            # a store holds its files in order, so one file's cells are one contiguous range
            a, b = np.searchsorted(s["file_index"], [fi, fi + 1])
            lo, hi = int(s["offsets"][a]), int(s["offsets"][b])
            for name in per_token:
                dt = dtype if name == "tokens" else np.dtype(OPTIONAL_PACKED[name][1])
                _file_segments(dirs[j], mans[j], fi, name, dt, s.get(name), lo, hi, out)
            outs["offsets"].write(t + (np.asarray(s["offsets"][a + 1:b + 1]) - lo))
            outs["cell_index"].write(np.asarray(s["cell_index"][a:b]))
            outs["file_index"].write(np.asarray(s["file_index"][a:b]))
            for name in per_cell:
                outs[name].write(np.asarray(s[name][a:b]))
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
                link_or_copy(src, tmp / rec["file"])
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
                    "n_tokens": n_tokens, "packed": {"dir": PACKED_DIR, "dtype": dtype, "optional": optional,
                                                 "layout": SEGMENTS},
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
