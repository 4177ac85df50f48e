"""Append-only journal of shard records beside an unfinished token run's manifest.

Recording a shard appends one JSON line here (flushed and fsynced) instead of rewriting the whole
manifest, so a shard costs the same with 10 or 10,000 shards recorded.  The manifest proper is
rewritten only at start, on non-shard updates and at finalisation, each time folding the journal in
and removing it; a finished dataset therefore has no journal and its manifest holds every record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._errors import StoreError
from .schema import META_DIR

JOURNAL = f"{META_DIR}/manifest.shards.jsonl"


def append_record(path: Path, rec: dict[str, Any]) -> None:
    """Append ``rec`` as one line, durable before this returns; a failed append leaves no fragment."""
    line = memoryview((json.dumps(rec, default=str, separators=(",", ":")) + "\n").encode())
    # a raw descriptor opened per record: no user-space buffer for a forked worker to inherit, and no
    # handle that outlives a fold (which unlinks the file)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.fstat(fd).st_size
        try:
            while line:
                line = line[os.write(fd, line):]
            os.fsync(fd)
        except BaseException:
            # e.g. a full disk: the next append must not continue a half line
            os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The journal's records in order (none if there is no journal).

    The last line may be torn (a crash during its append, or unsynced bytes after a power loss): it is
    ignored, and the shard it would have recorded counts as unrecorded.  A damaged line followed by
    intact ones cannot come from a crash and is refused.
    """
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    recs: list[dict[str, Any]] = []
    bad = None
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
            bad = bad or i + 1
            continue
        if bad is not None:
            msg = (f"{path}: line {bad} is damaged (not a shard record), so this run cannot be resumed; "
                   "start again with --overwrite")
            raise StoreError(msg)
        recs.append(rec)
    return recs


def fold(shards: Iterable[dict[str, Any]], journal: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The manifest's shard records with the journal's after them, one per file: a record present in
    both (a crash between a fold's manifest write and the journal's removal) is kept once."""
    by_file: dict[str, dict[str, Any]] = {}
    for rec in (*shards, *journal):
        by_file[rec["file"]] = rec
    return list(by_file.values())
