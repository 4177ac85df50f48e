"""Sharded token writer with an atomic, resumable manifest (the shard files: :mod:`.packed`).

Every shard is written to a temporary name and renamed into place, then recorded by one fsynced line
appended to the run's shard journal (:mod:`._journal`): O(1) per shard, where rewriting the manifest
after each shard was O(shards).  The manifest itself is replaced atomically at start, on
:meth:`~ShardedTokenWriter.update` and at finalisation, folding the journal in.  A crash leaves at most
a stray ``*.tmp`` file, an unrecorded shard or a torn last journal line, which a resumed run deletes or
ignores.  The manifest's ``status`` only becomes ``"complete"`` after the packed store is built, and a
complete manifest holds every shard record (no journal), in the same layout as ever.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import _arrow as arrow
from .._errors import StoreError
from .._lock import TOKENS_LOCK
from ._atomic import _atomic_write_text, _tmp_name
from ._journal import JOURNAL, append_record, fold, read_records
from .packed import (  # noqa: F401 - OPTIONAL_PACKED, _NpyAppender re-exported
    OPTIONAL_PACKED,
    ShardFiles,
    _NpyAppender,
    cell_appenders,
    npy_extent,
    packed_split,
    part_dir,
)
from .schema import FORMAT, MANIFEST, META_DIR, PACKED_DIR, PARTS_DIR, SEGMENTS, shard_name
from .segments import link_or_copy, segment_file

log = logging.getLogger("scfm_fast")


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which config entries differ, as ``key: old -> new`` (what a refused resume must name)."""
    def enc(v: Any) -> str:
        return json.dumps(v, sort_keys=True, default=str)

    keys = [k for k in dict.fromkeys([*old, *new]) if enc(old.get(k)) != enc(new.get(k))]
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "config differs"


def recorded_shards(out_dir: str | Path) -> list[dict[str, Any]]:
    """The shard records of the token run in ``out_dir``, finished or not: the manifest's, with an
    unfinished run's journal folded in (what ``--resume`` starts from)."""
    out = Path(out_dir)
    return _with_journal(json.loads((out / MANIFEST).read_text()), out / JOURNAL)["shards"]


def _with_journal(man: dict[str, Any], journal: Path) -> dict[str, Any]:
    """``man`` with the journal's shard records folded in, unless complete (it then holds every record,
    and a journal left beside it is stale)."""
    if man.get("status") != "complete":
        man["shards"] = fold(man.get("shards", []), read_records(journal))
    return man


#: names a token run writes at the top of its directory (anything else is not ours to delete)
_OWN_NAME = re.compile(rf"{re.escape(META_DIR)}|\.?part-\d{{4,}}-\d{{12,}}\.parquet(\.\d+)?(\.tmp)?")


def _entries(out: Path) -> list[Path]:
    """What ``out`` holds, except the lock file of the run that holds it (never ours to delete)."""
    lock = out / TOKENS_LOCK
    found = [p for p in out.iterdir() if p != lock.parent]
    if lock.parent.is_dir():
        found += [p for p in lock.parent.iterdir() if p != lock]
    return found


def _clear(out: Path) -> None:
    """Delete a token dataset's contents but keep the held lock file, so no other writer can slip in."""
    for p in _entries(out):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _check_replaceable(out: Path) -> None:
    """Refuse to delete a directory that holds anything but a token dataset (e.g. the input files)."""
    foreign = sorted(p.name for p in out.iterdir() if not _OWN_NAME.fullmatch(p.name))
    if foreign:
        msg = (f"{out}: --overwrite refused: the directory is not a token dataset (it holds "
               f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); pass a new or empty --out")
        raise StoreError(msg)


class ShardedTokenWriter:
    """Writes token shards into ``out_dir`` and keeps the manifest current.

    Each shard is written twice: as Parquet (the dataset users read) and as a small uncompressed
    packed part (a directory of ``.npy`` arrays: tokens in the packed dtype, offsets, cell/file
    index), from which :meth:`finalize` assembles the packed store by file-to-file copies instead of
    re-decoding Parquet.

    Parameters
    ----------
    out_dir
        Output directory.
    config
        Everything that determines the output (inputs, dictionary hashes, preset, options). A resumed
        run must have the same config, or it is refused.
    vocab_size
        Size of the token vocabulary: packed tokens are ``uint16`` when it fits, else ``int32``.
    resume
        Continue an interrupted run in ``out_dir``; resuming a complete run changes nothing
        (:attr:`complete` is then ``True``).
    overwrite
        Replace an existing output directory.
    """

    def __init__(self, out_dir: str | Path, *, config: dict[str, Any], vocab_size: int = 1 << 31,
                 resume: bool = False, overwrite: bool = False) -> None:
        self.out = Path(out_dir)
        self.config = config
        self.hash = config_hash(config)
        self.complete = False
        self.dtype = np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)
        man_path, self.journal = self.out / MANIFEST, self.out / JOURNAL
        if self.out.exists() and not self.out.is_dir():
            msg = f"{self.out}: is a file; --out must be a directory (new, empty, or a token dataset)"
            raise StoreError(msg)
        if self.out.exists() and _entries(self.out):
            old = self._read_manifest(man_path)
            if overwrite or (old is not None and old.get("status") != "complete" and not old.get("shards")
                             and not read_records(self.journal)):
                # a run that stopped before its first shard (e.g. on bad counts) holds nothing to
                # keep, so a corrected rerun needs neither --resume with the old options nor --overwrite
                _check_replaceable(self.out)
                _clear(self.out)
            elif not man_path.exists():
                msg = (f"{self.out}: not empty and has no {MANIFEST}, so it is not a token dataset to "
                       "resume; pass a new or empty --out")
                raise StoreError(msg)
            elif not resume:
                state = "a complete" if (old or {}).get("status") == "complete" else "an unfinished"
                msg = (f"{self.out}: already holds {state} token dataset; pass --resume to continue it "
                       "or --overwrite to replace it")
                raise StoreError(msg)
        self.parts = self.out / PARTS_DIR
        self.files = ShardFiles(self.out, self.dtype)
        if resume and man_path.exists():
            self.manifest = self._load_manifest(man_path)
            if self.manifest.get("config_hash") != self.hash:
                msg = (f"{self.out}: cannot resume: the existing run used different inputs or options "
                       f"({_config_diff(self.manifest.get('config', {}), config)}); use --overwrite or "
                       "a new --out")
                raise StoreError(msg)
            if (self.manifest.get("status") == "complete" and (self.out / PACKED_DIR).is_dir()
                    and all((self.out / s["file"]).is_file() for s in self.manifest["shards"])):
                # nothing left to do; only parts a crash after the final manifest left behind go
                shutil.rmtree(self.parts, ignore_errors=True)
                self.journal.unlink(missing_ok=True)  # left by a crash right after the final manifest
                self.complete = True
                self._index = {s["file"]: s for s in self.manifest["shards"]}
                return
            self.parts.mkdir(parents=True, exist_ok=True)
            self._clean_strays()
            self._repair_records()
            if self.manifest.get("status") == "complete":
                # only the packed store is gone: rebuilt by finalize() from the shards; the dataset
                # stays marked complete meanwhile (its shards are), so a crash now demotes nothing
                self._index = {s["file"]: s for s in self.manifest["shards"]}
                return
            self.manifest["status"] = "in_progress"
        else:
            self.parts.mkdir(parents=True, exist_ok=True)
            self.manifest = {"format": FORMAT, "status": "in_progress", "config_hash": self.hash,
                             "config": config, "shards": [], "created": time.time()}
        self._index = {s["file"]: s for s in self.manifest["shards"]}
        self._save()

    def _load_manifest(self, path: Path) -> dict[str, Any]:
        try:
            man = json.loads(path.read_text())
        except ValueError:
            man = None
        if not isinstance(man, dict) or not isinstance(man.get("shards"), list):
            msg = (f"{path}: the manifest is damaged (truncated or not JSON), so this run cannot be resumed; "
                   "start again with --overwrite")
            raise StoreError(msg)
        return _with_journal(man, self.journal)

    def _repair_records(self) -> None:
        """Redo recorded shards whose Parquet file is gone; rebuild missing packed parts from Parquet."""
        kept = []
        for rec in self.manifest["shards"]:
            shard = self.out / rec["file"]
            if not shard.is_file():
                continue  # dropped from the manifest: the resumed run tokenizes these cells again
            if not part_dir(self.parts, rec["file"]).is_dir():
                try:
                    extra = [c for c in OPTIONAL_PACKED if c in pq.read_schema(shard).names]
                    tab = pq.read_table(shard, columns=["input_ids", "cell_index", "file_index", *extra])
                except (OSError, pa.ArrowException):
                    shard.unlink()  # unreadable (damaged): redone like a missing one
                    continue
                self.files.write_part(tab, rec["file"])
            kept.append(rec)
        if len(kept) != len(self.manifest["shards"]):
            self.manifest["shards"] = kept
            self.manifest["status"] = "in_progress"

    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any] | None:
        """The existing manifest, or ``None`` if there is none or it cannot be read."""
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _clean_strays(self) -> None:
        known = {s["file"] for s in self.manifest["shards"]}
        for p in self.out.iterdir():
            if p.is_dir():
                continue
            if p.name.endswith(".tmp") or (p.suffix == ".parquet" and p.name not in known):
                # a shard in progress at the crash, or one written but never recorded
                p.unlink()
        for p in self.parts.iterdir():
            # also an older run's .npz parts: _repair_records rebuilds them from the Parquet shards
            if p.name.endswith(".tmp") or not p.is_dir() or p.name.replace(".part", ".parquet") not in known:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        shutil.rmtree(self.out / PACKED_DIR, ignore_errors=True)
        for p in (self.out / META_DIR).glob("*.tmp"):  # a packed store or manifest in progress at the crash
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _save(self) -> None:
        """Rewrite the whole manifest (every shard record in it), then drop the journal it now holds."""
        self.manifest["updated"] = time.time()
        _atomic_write_text(self.out / MANIFEST, json.dumps(self.manifest, indent=1, default=str))
        # a crash before this unlink leaves records in both: folded once on resume (by file name), so a
        # journal that cannot be removed is harmless: the run goes on (and a complete one stays complete)
        try:
            self.journal.unlink(missing_ok=True)
        except OSError as e:
            log.warning("%s: could not remove the shard journal (%s); its records are also in the manifest, "
                        "so nothing is lost (a later --resume removes it)", self.journal, e)

    def done(self, file_index: int, start: int) -> dict[str, Any] | None:
        """The manifest record of a finished shard, or ``None``."""
        return self._index.get(shard_name(file_index, start))

    def write_shard(self, table: pa.Table, *, file_index: int, start: int, stop: int,
                    stats: dict[str, Any]) -> None:
        """Write one shard (Parquet + packed part) atomically, then record it in the manifest."""
        name = shard_name(file_index, start)
        self.files.write(table, name)
        self.record(name, file_index=file_index, start=start, stop=stop, n_cells_written=table.num_rows,
                    stats=stats)

    def record(self, name: str, *, file_index: int, start: int, stop: int, n_cells_written: int,
               stats: dict[str, Any]) -> None:
        """Record a shard that :attr:`files` wrote (possibly in a worker process): one line appended to
        the journal, O(1) however many shards are recorded; the manifest takes it in at finalisation."""
        rec = {"file": name, "file_index": file_index, "start": start, "stop": stop,
               "n_cells_written": n_cells_written, **stats}
        append_record(self.journal, rec)  # durable first: a failed append records nothing
        self.manifest["shards"].append(rec)
        self._index[name] = rec

    def update(self, **fields: Any) -> None:
        """Set non-shard manifest fields (inputs, gene match, QC); rewrites the whole manifest."""
        self.manifest.update(fields)
        self._save()

    def _verify_shard(self, rec: dict[str, Any], lengths: np.ndarray, cell_index: np.ndarray) -> None:
        """The Parquet shard holds exactly the cells of its manifest record and of its packed part."""
        shard = self.out / rec["file"]
        try:
            # ParquetFile, not read_table: read_table goes through pyarrow.dataset, which imports pandas
            with pq.ParquetFile(shard) as f:
                tab = f.read(columns=["length", "cell_index"])
        except (OSError, pa.ArrowException) as e:
            msg = (f"{shard}: cannot read this shard ({e}); rerun the same `scfm tokenize ... --resume` to "
                   "redo it")
            raise StoreError(msg) from None
        got = arrow.to_numpy(tab.column("length"))
        if (tab.num_rows != rec["n_cells_written"] or int(got.sum()) != rec["n_tokens"]
                or not np.array_equal(got, lengths)
                or not np.array_equal(arrow.to_numpy(tab.column("cell_index")), cell_index)):
            msg = (f"{shard}: holds {tab.num_rows} cells / {int(got.sum())} tokens, but its manifest record "
                   f"and packed part say {rec['n_cells_written']} / {rec['n_tokens']} (was it written by "
                   "another run?); rerun with --overwrite")
            raise StoreError(msg)

    def finalize(self, **summary: Any) -> dict[str, Any]:
        """Verify every shard, assemble the packed store from the shard parts (streaming, bounded memory)
        and mark the dataset complete.

        Raises
        ------
        StoreError
            No cell was written (every cell filtered out or without a vocabulary gene), or a shard does
            not match its manifest record and packed part. Nothing is marked complete then, and the
            temporary packed store is removed.
        """
        shards = sorted(self.manifest["shards"], key=lambda s: (s["file_index"], s["start"]))
        n_cells = sum(s["n_cells_written"] for s in shards)
        n_tokens = sum(s["n_tokens"] for s in shards)
        if n_cells == 0:
            why = {k: sum(s.get(k, 0) for s in shards) for k in ("n_cells_in", "n_filtered", "n_empty")}
            msg = (f"{self.out}: no cell to write: of {why['n_cells_in']:,} cells read, {why['n_filtered']:,} "
                   f"have filter_pass != 1 and {why['n_empty']:,} express no vocabulary gene; check the "
                   "filter_pass column, --gene-id-column and --layer")
            raise StoreError(msg)
        tmp = self.out / META_DIR / _tmp_name("packed")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            self._assemble(tmp, shards, n_cells, n_tokens)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed finalisation leaves no temporary files
            raise
        shutil.rmtree(self.out / PACKED_DIR, ignore_errors=True)
        os.replace(tmp, self.out / PACKED_DIR)
        self.manifest.update(status="complete", n_cells=n_cells, n_tokens=n_tokens,
                             packed={"dir": PACKED_DIR, "dtype": self.dtype.name,
                                     "optional": self._optional_arrays(shards), "layout": SEGMENTS},
                             **summary)
        self._save()
        # the parts go only once the manifest says complete, so a crash in between can still resume
        shutil.rmtree(self.parts, ignore_errors=True)
        self.complete = True
        return self.manifest

    def _optional_arrays(self, shards: list[dict[str, Any]]) -> list[str]:
        """The optional packed arrays (values, species) the shard parts carry (all parts alike)."""
        first = part_dir(self.parts, shards[0]["file"])
        return [name for name in OPTIONAL_PACKED if (first / f"{name}.npy").is_file()]

    def _assemble(self, tmp: Path, shards: list[dict[str, Any]], n_cells: int, n_tokens: int) -> None:
        # Per-token arrays (tokens, values) become segments: each part's file is hard-linked, not copied
        # (the copy was a serial pass over every token at the end of the run).  Per-cell arrays are small
        # and appended into one file each (plain appends, not memory maps: dirty mapped pages would
        # count against the process's memory and grow with the corpus).
        optional = self._optional_arrays(shards)
        segmented, per_cell = packed_split(optional)
        outs = cell_appenders(tmp, n_cells=n_cells, optional=per_cell)
        for name in segmented:
            (tmp / name).mkdir()
        ok = False
        try:
            outs["offsets"].write(np.zeros(1, dtype=np.int64))
            t = 0
            for s in shards:
                part = part_dir(self.parts, s["file"])
                lo, cell_index = np.load(part / "offsets.npy"), np.load(part / "cell_index.npy")
                tok_dtype, n_tok, _ = npy_extent(part / "tokens.npy")
                if (tok_dtype != self.dtype or n_tok != s["n_tokens"] or lo.size - 1 != s["n_cells_written"]
                        or int(lo[-1]) != n_tok):
                    msg = f"{part}: shard part does not match the manifest; rerun with --overwrite"
                    raise StoreError(msg)
                self._verify_shard(s, np.diff(lo), cell_index)
                for name in segmented:
                    if name != "tokens" and npy_extent(part / f"{name}.npy")[:2] != (OPTIONAL_PACKED[name][1], n_tok):
                        msg = f"{part / name}.npy: not aligned with the part's tokens; rerun with --overwrite"
                        raise StoreError(msg)
                    if n_tok:  # an empty shard has no segment
                        link_or_copy(part / f"{name}.npy", segment_file(tmp / name, s["file"]))
                outs["offsets"].write(t + lo[1:])
                outs["cell_index"].write(cell_index)
                outs["file_index"].copy_from(part / "file_index.npy")
                for name in per_cell:
                    outs[name].copy_from(part / f"{name}.npy")
                t += n_tok
            ok = True
        finally:
            # a short file is an error only when nothing else failed first (never mask the cause)
            for o in outs.values():
                o.close(check=ok)
