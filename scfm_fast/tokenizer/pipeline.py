"""Corpus tokenization: readers -> rank-value core -> sharded token store, with progress and resume."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .. import _arrow as arrow
from .._errors import CountDataError, InputFileError, ScfmError, UsageError
from .._lock import TOKENS_LOCK, OutputLock
from .._progress import progress
from ..readers.obs import column_to_arrow, column_to_float
from ._inputs import FILTER_COLUMN, filter_mask, parse_shard, resolve_input, shard_files
from ._pieces import piece_size
from ._run import FilePlan, n_workers, pending_chunks, run_in_process, run_workers, use_workers
from .counts import ranked_counts
from .qc import check_qc_mode
from .reference import check_counts_ref, count_problem
from .spec import TokenizerSpec, _check_options, spec_options
from .species import species_codes

log = logging.getLogger("scfm_fast")

TOTAL_COLUMN = "n_counts"
#: ``keep_counts`` output column (Geneformer's name): normalised counts in rank order
COUNTS_COLUMN = "counts"


def _input_fingerprint(p: Path) -> dict[str, Any]:
    """Size and modification time of an input, so that ``--resume`` refuses an input changed in place.

    For a directory store (Zarr) the newest modification time of its entries two levels down: cheap
    (no walk over millions of chunk files), and any array rewritten through zarr touches those.
    """
    if p.is_file():
        st = p.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    newest = p.stat().st_mtime_ns
    for child in p.iterdir():
        newest = max(newest, child.stat().st_mtime_ns)
        if child.is_dir():
            newest = max([newest, *(c.stat().st_mtime_ns for c in child.iterdir())])
    return {"size": None, "mtime_ns": newest}


def _check_distinct(paths: Sequence[str | Path]) -> None:
    """The same input twice would write every one of its cells twice."""
    seen: dict[Path, str | Path] = {}
    for p in paths:
        key = Path(p).resolve()
        if key in seen:
            msg = f"{p}: given twice as input (also as {seen[key]}); each of its cells would count twice"
            raise UsageError(msg)
        seen[key] = p


def _bad_count_error(path: str, chunk, var_names, *, allow_non_integer: bool) -> CountDataError:
    """Locate the first bad count of a chunk and name its file, cell and gene."""
    try:
        check_counts_ref(chunk.indptr, chunk.data, allow_non_integer=allow_non_integer)
    except CountDataError as e:
        j = int(str(e).split("stored entry ")[1].split(";")[0])
        row = int(np.searchsorted(chunk.indptr, j, side="right") - 1)
        names = chunk.meta.index
        cell = names[row] if len(names) > row else chunk.start + row
        gene = var_names[int(chunk.indices[j])]
        value = float(chunk.data[j])
        what = count_problem(value)
        fix = "tokenization needs raw counts - pick them with --layer/use_raw"
        if what == "a non-integer count":
            fix += ", or pass --allow-non-integer if fractional counts are intended"
        # str()/float() so numpy scalars print as values, not as np.str_('...') reprs.
        msg = (f"{path}: cell '{cell}' (row {chunk.start + row}), gene '{gene}': {what} ({value!r}) is not "
               f"a raw count; {fix}")
        return CountDataError(msg)
    return CountDataError(f"{path}: invalid counts in rows {chunk.start}..{chunk.stop}")


def _chunk_totals(path: str, chunk) -> np.ndarray | None:
    meta = chunk.meta
    if TOTAL_COLUMN not in meta:
        return None
    tot = column_to_float(meta[TOTAL_COLUMN])
    bad = ~np.isfinite(tot) | (tot < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        msg = (f"{path}: cell '{meta.index[i]}' (row {chunk.start + i}) has {TOTAL_COLUMN}="
               f"{float(tot[i])!r}; {TOTAL_COLUMN} must be the cell's total raw count (or drop the column to "
               "have it computed)")
        raise CountDataError(msg)
    return tot


def _count_sums(indices, data, col_token):
    """Total counts and counts on vocabulary genes, in one pass (for the match report)."""
    from ._sums import count_sums  # the C++ core (Numba only without it): imported on first use

    return count_sums(indices, data, col_token)


def _list_array(tokens: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
    return arrow.list_array(offsets, arrow.array(tokens, dtype=np.int32))


def tokenize_chunk(spec: TokenizerSpec, chunk, col_token: np.ndarray, *, path: str, var_names,
                   file_index: int = 0, obs_columns: Sequence[str] = (),
                   qc_keep: np.ndarray | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Tokenize one :class:`~scfm_fast.readers.base.CellChunk` into a shard table and its counts.

    ``qc_keep``: the chunk's cells that passed ``--qc`` (``None``: no QC).
    """
    meta = chunk.meta
    totals = _chunk_totals(path, chunk)
    values = None
    sums = np.zeros(3)  # the match report's count sums, when the core takes them in its rank pass
    try:
        if spec.values:
            tokens, values, offsets, cell_totals = spec.tokenize_values_csr(
                chunk.indptr, chunk.indices, chunk.data, col_token=col_token, totals=totals, sums=sums)
        else:
            tokens, offsets, cell_totals = spec.tokenize_csr(chunk.indptr, chunk.indices, chunk.data,
                                                             col_token=col_token, totals=totals, sums=sums)
    except CountDataError:
        raise _bad_count_error(path, chunk, var_names, allow_non_integer=spec.allow_non_integer) from None
    except ScfmError:
        raise
    except (ValueError, TypeError, IndexError) as e:  # the core's structural checks (indptr, indices)
        msg = (f"{path}: rows {chunk.start}..{chunk.stop - 1} cannot be tokenized ({e}); the file is damaged: "
               "re-export / re-copy the file")
        raise InputFileError(msg) from None
    lengths = np.diff(offsets)
    passed = filter_mask(path, chunk)
    n_filtered = int((~passed).sum())
    n_qc_dropped = 0
    if qc_keep is not None:
        n_qc_dropped = int((passed & ~qc_keep).sum())
        passed &= qc_keep
    n_empty = int(((lengths == 0) & passed).sum())
    keep = (lengths > 0) & passed
    if sums[2]:
        counts_total, counts_matched = float(sums[0]), float(sums[1])
    else:
        counts_total, counts_matched = _count_sums(chunk.indices, chunk.data, col_token)
    ids = _list_array(tokens, offsets)
    rows = np.flatnonzero(keep)
    cols: dict[str, Any] = {
        "input_ids": ids,
        "length": arrow.array(lengths, dtype=np.int32),
        "cell_index": arrow.array(np.arange(chunk.start, chunk.stop, dtype=np.int64)),
        "file_index": arrow.array(np.full(chunk.n_cells, file_index, dtype=np.int32)),
        "cell_id": arrow.strings([str(v) for v in meta.index] if len(meta) == chunk.n_cells
                                 else [str(i) for i in range(chunk.start, chunk.stop)]),
    }
    if values is not None:
        cols["values"] = arrow.list_array(offsets, arrow.array(values, dtype=np.float32))
        cols["species"] = arrow.array(species_codes(meta, chunk.start, species=spec.species,
                                                      column=spec.species_column, path=path), dtype=np.int8)
    if spec.keep_counts:
        vals = ranked_counts(chunk.indptr, chunk.indices, chunk.data, col_token=col_token, tokens=tokens,
                             offsets=offsets, totals=cell_totals)
        cols[COUNTS_COLUMN] = arrow.list_array(offsets, arrow.array(vals))
    for c in obs_columns:
        if c not in cols:
            cols[c] = column_to_arrow(meta[c])
    table = pa.table(cols)
    if rows.size != chunk.n_cells:
        table = table.take(arrow.array(rows))
    stats = {"n_cells_in": chunk.n_cells, "n_empty": n_empty, "n_filtered": n_filtered,
             "n_tokens": int(lengths[keep].sum()), "n_at_max_len": int((lengths[keep] >= spec.max_len).sum()),
             "counts_total": counts_total, "counts_matched": counts_matched, "n_qc_dropped": n_qc_dropped}
    return table, stats


def tokenize_corpus(
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    preset: str = "geneformer-v1",
    token_dictionary: str | Path | None = None,
    gene_median: str | Path | None = None,
    gene_name_map: str | Path | None = "auto",
    orthologs: str | Path | None = None,
    gene_id_column: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    obs_columns: Sequence[str] = (),
    chunk_size: int = 10_000,
    max_len: int | None = None,
    n_threads: int | None = None,
    backend: str = "auto",
    min_gene_match: float = 0.2,
    allow_non_integer: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    progress_bar: bool | None = True,
    allow_case_insensitive: bool = False,
    species: str | None = None,
    species_column: str | None = None,
    normalize_total: float | None = None,
    qc: str | None = None,
    gene_mapping_file: str | Path | None = None,
    keep_counts: bool = False,
    shard: str | None = None,
) -> dict[str, Any]:
    """Tokenize one or more files into a token dataset directory (see :mod:`scfm_fast.store.schema`).

    Parameters
    ----------
    inputs
        ``.h5ad``, AnnData-Zarr (v2/v3) or ``.loom`` paths.
    out
        Output directory.
    preset
        ``"geneformer-v1"`` (2,048 tokens) or ``"geneformer-v2"`` (4,096 with ``<cls>``/``<eos>``).
    token_dictionary, gene_median
        Geneformer-format pickles; default: the preset's bundled dictionaries.
    gene_name_map
        Symbol -> Ensembl table (``"auto"``: Geneformer's bundled ``gene_name_id_dict.pkl``; ``None``: off).
    orthologs
        ``"mouse-to-human"`` (bundled one-to-one orthologs) or a table path, for mouse input to a
        human vocabulary.
    gene_id_column
        var column holding gene ids (``"index"``: the var index). When not given, a run whose default
        ids match the vocabulary clearly worse than another var column stops and names that column.
    layer, use_raw
        Where the raw counts are (default ``X``).
    obs_columns
        Cell metadata columns to carry into the output.
    chunk_size
        Cells per chunk and per output shard; bounds memory.
    max_len
        Override the preset's model input size.
    n_threads
        ``--workers``: ``N > 1`` runs N processes that each read, rank and write whole chunks (for
        inputs of at least 40,000 cells); otherwise one process with reading, ranking and writing on
        three overlapping threads and the core on ``n_threads`` threads. Default: one worker per core
        (at most 8), or one process with the core on all cores below 40,000 cells. The output is the
        same either way.
    backend
        ``"auto"``, ``"cpp"``, ``"numba"`` or ``"reference"``.
    min_gene_match
        Refuse inputs where fewer than this fraction of genes match the vocabulary.
    allow_non_integer
        Accept fractional counts.
    resume, overwrite
        Continue an interrupted run in ``out`` / replace an existing one.
    progress_bar
        Show a progress bar (cells/s).
    allow_case_insensitive
        Accept inputs whose genes mostly match human symbols only when case is ignored (without it such
        mouse-looking input stops unless ``orthologs`` is given); the manifest's ``gene_match`` records
        ``n_case_insensitive`` either way.
    species, species_column
        ``--preset genecompass`` only (exactly one): every cell's species (``"human"``/``"mouse"``),
        or the obs column holding it (human/mouse or 0/1); written as the int8 ``species`` column.
    normalize_total
        ``--preset genecompass`` only: a library-size target (e.g. 10,000) for the values.
    qc
        ``"genecompass"``: drop cells by GeneCompass's QC within each file
        (:mod:`scfm_fast.tokenizer.qc`); the dropped counts go into the manifest's ``qc``.
    gene_mapping_file
        Geneformer's gene mapping pickle (id -> vocabulary Ensembl id): ids upper-cased and mapped,
        raw counts of ids mapping onto one gene summed, unmapped ids dropped (counted in the report).
    keep_counts
        Add a ``counts`` column: each token's ``count / total * 10,000`` in rank order (Geneformer's
        ``keep_counts``; ``0.0`` at ``<cls>``/``<eos>``).
    shard
        ``"K/N"``: tokenize only every N-th input, starting with the K-th (1-based), keeping each file's
        index in the full input list; join the N outputs with :func:`~scfm_fast.store.merge.merge_token_datasets`.

    Returns
    -------
    dict
        The completed manifest (also at ``out/manifest.json``).
    """
    from ..readers import open_reader
    from ..store.schema import BASE_COLUMNS
    from ..store.writer import ShardedTokenWriter

    paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not paths:
        msg = "no input files given"
        raise InputFileError(msg)
    _check_distinct(paths)
    _check_options(max_len=None, n_special=0, n_threads=None, chunk_size=chunk_size)
    check_qc_mode(qc)
    shard_kn = parse_shard(shard)
    # global file indexes: a shard's files keep their index in the full input list, so that merged
    # shard outputs equal a single run's output
    file_ids = shard_files(len(paths), shard_kn)
    if not file_ids:
        msg = f"--shard {shard}: takes no file of the {len(paths)} inputs; use at most {len(paths)} shards"
        raise UsageError(msg)
    spec = TokenizerSpec.build(**spec_options(locals()))  # no option of build's is rebound above
    all_paths, paths = paths, [paths[i] for i in file_ids]
    reader_kw = {"layer": layer, "use_raw": use_raw, "gene_id_column": gene_id_column}
    want = list(dict.fromkeys(obs_columns))
    clash = [c for c in want if c in BASE_COLUMNS or (keep_counts and c == COUNTS_COLUMN)]
    if clash:
        msg = (f"obs column(s) {clash} share a name with the output's own columns {list(BASE_COLUMNS)}; "
               "copy them to another name in obs (e.g. obs['orig_length'] = obs['length']) and pass that")
        raise UsageError(msg)
    # Each input is opened, checked and resolved, then closed again (opened anew to read its cells): a
    # corpus of thousands of files must not hold thousands of handles (``ulimit -n`` is often 1,024).
    plans: list[FilePlan] = []
    resolved = []
    for fi, p in zip(file_ids, paths):
        with open_reader(str(p), **reader_kw) as r:
            missing = [c for c in want + ([species_column] if species_column else []) if c not in r.obs_columns]
            if missing:
                msg = (f"{p}: obs column(s) {missing} not found; available: {sorted(r.obs_columns)}")
                raise InputFileError(msg)
            if r.n_obs == 0:
                msg = f"{p}: has no cells"
                raise InputFileError(msg)
            col_token, report, gene_ids = resolve_input(str(p), r, spec, gene_id_column=gene_id_column,
                                                         allow_case_insensitive=allow_case_insensitive)
            log.info("%s: %s", p, report.summary())
            resolved.append(report)
            read_cols = list(dict.fromkeys(
                want + [c for c in (TOTAL_COLUMN, FILTER_COLUMN, species_column) if c in r.obs_columns]))
            plans.append(FilePlan(fi, str(p), r.n_obs, col_token, gene_ids, read_cols, None))
    lock = OutputLock(out, command="tokenize", lock_name=TOKENS_LOCK)
    try:
        config = {**spec.config, "inputs": [str(Path(p).resolve()) for p in all_paths],
                  "input_fingerprints": [_input_fingerprint(Path(p)) for p in paths],
                  "gene_id_column": gene_id_column, "layer": layer, "use_raw": use_raw,
                  "obs_columns": want, "chunk_size": chunk_size, **({"qc": qc} if qc else {}),
                  **({"allow_case_insensitive": True} if allow_case_insensitive else {})}
        if shard_kn is not None:
            config["shard"] = {"k": shard_kn[0], "n": shard_kn[1], "files": file_ids}
        lock.acquire()  # one writer per --out, held until the dataset is complete or the run fails
        writer = ShardedTokenWriter(out, config=config, vocab_size=spec.vocab.size, resume=resume,
                                    overwrite=overwrite)
        if writer.complete:
            log.info("%s: already complete (%d cells); nothing to do", out, writer.manifest.get("n_cells", 0))
            return {**writer.manifest, "already_complete": True}
        writer.update(inputs=[str(p) for p in paths], gene_match=[rep.to_dict() for rep in resolved],
                      **({"file_indexes": file_ids} if shard_kn is not None else {}))
        if qc == "genecompass":
            from .qc import file_qc

            # the z-scores need the whole file: one streaming pass per file before tokenizing
            qc_reports = []
            for plan in plans:
                with open_reader(plan.path, **reader_kw, max_block_rows=piece_size(chunk_size)) as r:
                    plan.qc_keep, qc_report = file_qc(r, chunk_size=chunk_size)
                qc_reports.append(qc_report.to_dict())
            writer.update(qc={"mode": qc, "files": qc_reports})
        todo, n_done = pending_chunks(plans, writer, chunk_size)
        workers = n_workers(n_threads)
        t0 = time.perf_counter()
        with progress(total=sum(p.n_obs for p in plans), desc="tokenize", enabled=progress_bar) as bar:
            bar.update(n_done)
            if use_workers(workers, todo, chunk_size):
                run_workers(plans, writer, todo, spec=spec, workers=workers, chunk_size=chunk_size,
                            obs_columns=want, bar=bar, reader_kw=reader_kw)
            else:
                run_in_process(plans, writer, spec=spec, chunk_size=chunk_size, obs_columns=want,
                               reader_kw=reader_kw, bar=bar)
        shards = writer.manifest["shards"]
        summ = {k: sum(s.get(k, 0) for s in shards) for k in
                ("n_cells_in", "n_empty", "n_filtered", "n_at_max_len", "counts_total", "counts_matched",
                 "n_qc_dropped")}
        summ["fraction_counts_matched"] = summ["counts_matched"] / max(summ["counts_total"], 1e-300)
        summ["seconds"] = time.perf_counter() - t0
        return writer.finalize(summary=summ)
    finally:
        lock.release()


def __getattr__(name: str) -> Any:
    # ``tokenize_anndata`` lives in .in_memory (which imports this module); still importable from here
    if name == "tokenize_anndata":
        from .in_memory import tokenize_anndata

        return tokenize_anndata
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
