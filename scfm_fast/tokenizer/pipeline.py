"""Corpus tokenization: readers -> rank-value core -> sharded token store, with progress and resume."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pandas as pd
import pyarrow as pa

from .._errors import CountDataError, InputFileError, ScfmError, UsageError
from .._lock import TOKENS_LOCK, OutputLock
from .._progress import progress
from ..store.schema import with_table_config
from ..vocab import GeneVocab, get_preset, load_gene_name_map, load_ortholog_map, resolve_genes
from ..vocab.dictionaries import SPECIAL_TOKENS
from ._inputs import FILTER_COLUMN, filter_mask, resolve_input
from .qc import check_qc_mode
from .reference import check_counts_ref, count_problem
from .species import check_species_options, species_codes

log = logging.getLogger("scfm_fast")

TOTAL_COLUMN = "n_counts"


@dataclass
class TokenizerSpec:
    """Everything that maps source genes to tokens (the same for every input file)."""

    preset: str = "geneformer-v1"
    vocab: GeneVocab | None = None
    gene_name_map: dict[str, str] | None = None
    ortholog_map: dict[str, str] | None = None
    max_len: int | None = None
    min_gene_match: float = 0.2
    allow_non_integer: bool = False
    backend: str = "auto"
    n_threads: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    values: bool = False  # GeneCompass: values beside the tokens, and a species per cell
    normalize_total: float | None = None
    species: str | None = None
    species_column: str | None = None

    @classmethod
    def build(cls, *, preset: str = "geneformer-v1", token_dictionary: str | Path | None = None,
              gene_median: str | Path | None = None, gene_name_map: str | Path | None = "auto",
              orthologs: str | Path | None = None, max_len: int | None = None,
              min_gene_match: float = 0.2, allow_non_integer: bool = False, backend: str = "auto",
              n_threads: int | None = None, species: str | None = None, species_column: str | None = None,
              normalize_total: float | None = None) -> TokenizerSpec:
        pre = get_preset(preset)
        _check_options(max_len=max_len, n_special=pre.n_special, n_threads=n_threads)
        check_species_options(pre, species=species, species_column=species_column,
                               normalize_total=normalize_total)
        vocab = GeneVocab.load(token_dictionary=token_dictionary, gene_median=gene_median, preset=preset)
        names = None
        if gene_name_map == "auto":
            # ids that are already in the vocabulary match first, so the symbol table never overrides them
            names = load_gene_name_map(pre.gene_name_map)  # the preset's table (None: Geneformer's)
        elif gene_name_map is not None:
            names = load_gene_name_map(gene_name_map)
        orth = load_ortholog_map(orthologs) if orthologs else None
        spec = cls(preset, vocab, names, orth, pre.max_len if max_len is None else max_len, min_gene_match,
                   allow_non_integer, backend, n_threads)
        spec.config = {"preset": preset, "max_len": spec.max_len, "dictionary_hashes": vocab.hashes,
                       "gene_name_map": str(gene_name_map), "orthologs": _path_or_name(orthologs),
                       "allow_non_integer": allow_non_integer, "tie_order": "token id ascending",
                       "special_tokens": {t: vocab.token_of[t] for t in SPECIAL_TOKENS if t in vocab.token_of}}
        if pre.values:
            spec.values, spec.normalize_total = True, normalize_total
            spec.species, spec.species_column = species, species_column
            spec.config.update(values=True, normalize_total=normalize_total, species=species,
                               species_column=species_column)
        # validates that the dictionary holds the preset's special tokens
        spec.cls_id, spec.eos_id = vocab.special_id(pre.cls), vocab.special_id(pre.eos)
        return spec

    def tokenize_csr(self, indptr, indices, data, *, col_token, totals=None):
        from .rank import tokenize_rank

        return tokenize_rank(indptr, indices, data, col_token=col_token,
                             token_median=self.vocab.token_median, max_len=self.max_len,
                             cls_token=self.cls_id, eos_token=self.eos_id, totals=totals,
                             allow_non_integer=self.allow_non_integer, backend=self.backend,
                             n_threads=self.n_threads)

    def tokenize_values_csr(self, indptr, indices, data, *, col_token, totals=None):
        from .values import tokenize_values

        return tokenize_values(indptr, indices, data, col_token=col_token,
                               token_median=self.vocab.token_median, max_len=self.max_len,
                               normalize_total=self.normalize_total, totals=totals,
                               allow_non_integer=self.allow_non_integer, backend=self.backend,
                               n_threads=self.n_threads)


def _path_or_name(value: Any) -> str:
    """A table option as recorded in the manifest: a bundled name as is, a file as an absolute path (so
    that later commands run from another directory find it)."""
    if value is None or not Path(str(value)).exists():
        return str(value)
    return str(Path(str(value)).resolve())


def _check_options(*, max_len: int | None, n_special: int, n_threads: int | None,
                   chunk_size: int = 1) -> None:
    """Refuse option values that would be ignored or fail deep inside the run."""
    if max_len is not None and max_len < n_special + 1:
        msg = (f"--max-len {max_len} leaves no room for genes after {n_special} special tokens; pass at "
               f"least {n_special + 1}")
        raise UsageError(msg)
    if n_threads is not None and n_threads < 1:
        msg = f"--workers must be at least 1 (or left out for all cores), got {n_threads}"
        raise UsageError(msg)
    if chunk_size < 1:
        msg = f"--chunk-size must be at least 1, got {chunk_size}"
        raise UsageError(msg)


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
        cell = chunk.obs.index[row] if len(chunk.obs.index) > row else chunk.start + row
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
    if TOTAL_COLUMN not in chunk.obs.columns:
        return None
    tot = pd.to_numeric(chunk.obs[TOTAL_COLUMN], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(tot) | (tot < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        msg = (f"{path}: cell '{chunk.obs.index[i]}' (row {chunk.start + i}) has {TOTAL_COLUMN}="
               f"{float(tot[i])!r}; {TOTAL_COLUMN} must be the cell's total raw count (or drop the column to "
               "have it computed)")
        raise CountDataError(msg)
    return tot


@numba.njit(cache=True, nogil=True)
def _count_sums(indices, data, col_token):
    """Total counts and counts on vocabulary genes, in one pass (for the match report)."""
    tot = 0.0
    matched = 0.0
    for k in range(indices.shape[0]):
        v = float(data[k])
        tot += v
        if col_token[indices[k]] >= 0:
            matched += v
    return tot, matched


def _list_array(tokens: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(tokens, type=pa.int32()))


def _obs_array(col: pd.Series) -> pa.Array:
    """One obs column as Arrow, typed by its dtype alone, so that every shard gets the same type."""
    if not (col.dtype == object or isinstance(col.dtype, (pd.CategoricalDtype, pd.StringDtype))):
        return pa.array(col, from_pandas=True)
    # categorical / object / string columns become plain strings (shards share no dictionary); typed
    # explicitly, since a chunk whose values are all missing would otherwise infer Arrow's null type
    # and make the shards' schemas incompatible
    values = col.astype(object).where(col.notna(), None)
    return pa.array([v if v is None else str(v) for v in values], type=pa.string())


def tokenize_chunk(spec: TokenizerSpec, chunk, col_token: np.ndarray, *, path: str, var_names,
                   file_index: int = 0, obs_columns: Sequence[str] = (),
                   qc_keep: np.ndarray | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Tokenize one :class:`~scfm_fast.readers.base.CellChunk` into a shard table and its counts.

    ``qc_keep``: the chunk's cells that passed ``--qc`` (``None``: no QC).
    """
    totals = _chunk_totals(path, chunk)
    values = None
    try:
        if spec.values:
            tokens, values, offsets, _ = spec.tokenize_values_csr(chunk.indptr, chunk.indices, chunk.data,
                                                                  col_token=col_token, totals=totals)
        else:
            tokens, offsets, _ = spec.tokenize_csr(chunk.indptr, chunk.indices, chunk.data,
                                                   col_token=col_token, totals=totals)
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
    counts_total, counts_matched = _count_sums(chunk.indices, chunk.data, col_token)
    ids = _list_array(tokens, offsets)
    rows = np.flatnonzero(keep)
    cols: dict[str, Any] = {
        "input_ids": ids,
        "length": pa.array(lengths.astype(np.int32)),
        "cell_index": pa.array(np.arange(chunk.start, chunk.stop, dtype=np.int64)),
        "file_index": pa.array(np.full(chunk.n_cells, file_index, dtype=np.int32)),
        "cell_id": pa.array(chunk.obs.index.astype(str).to_numpy() if len(chunk.obs.index) == chunk.n_cells
                            else np.arange(chunk.start, chunk.stop).astype(str)),
    }
    if values is not None:
        cols["values"] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                                  pa.array(values, type=pa.float32()))
        cols["species"] = pa.array(species_codes(chunk.obs, chunk.start, species=spec.species,
                                                    column=spec.species_column, path=path), type=pa.int8())
    for c in obs_columns:
        if c not in cols:
            cols[c] = _obs_array(chunk.obs[c])
    table = pa.table(cols)
    if rows.size != chunk.n_cells:
        table = table.take(pa.array(rows))
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
        Threads of the compiled core (default: all cores).
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
    spec = TokenizerSpec.build(preset=preset, token_dictionary=token_dictionary, gene_median=gene_median,
                               gene_name_map=gene_name_map, orthologs=orthologs, max_len=max_len,
                               min_gene_match=min_gene_match, allow_non_integer=allow_non_integer,
                               backend=backend, n_threads=n_threads, species=species,
                               species_column=species_column, normalize_total=normalize_total)
    readers = [open_reader(str(p), layer=layer, use_raw=use_raw, gene_id_column=gene_id_column) for p in paths]
    lock = OutputLock(out, command="tokenize", lock_name=TOKENS_LOCK)
    try:
        want = list(dict.fromkeys(obs_columns))
        clash = [c for c in want if c in BASE_COLUMNS]
        if clash:
            msg = (f"obs column(s) {clash} share a name with the output's own columns {list(BASE_COLUMNS)}; "
                   "copy them to another name in obs (e.g. obs['orig_length'] = obs['length']) and pass that")
            raise UsageError(msg)
        resolved = []
        for p, r in zip(paths, readers):
            missing = [c for c in want + ([species_column] if species_column else []) if c not in r.obs_columns]
            if missing:
                msg = (f"{p}: obs column(s) {missing} not found; available: {sorted(r.obs_columns)}")
                raise InputFileError(msg)
            if r.n_obs == 0:
                msg = f"{p}: has no cells"
                raise InputFileError(msg)
            col_token, report = resolve_input(str(p), r, spec, gene_id_column=gene_id_column,
                                               allow_case_insensitive=allow_case_insensitive)
            log.info("%s: %s", p, report.summary())
            resolved.append((col_token, report))
        config = {**spec.config, "inputs": [str(Path(p).resolve()) for p in paths],
                  "input_fingerprints": [_input_fingerprint(Path(p)) for p in paths],
                  "gene_id_column": gene_id_column, "layer": layer, "use_raw": use_raw,
                  "obs_columns": want, "chunk_size": chunk_size, **({"qc": qc} if qc else {}),
                  **({"allow_case_insensitive": True} if allow_case_insensitive else {})}
        lock.acquire()  # one writer per --out, held until the dataset is complete or the run fails
        writer = ShardedTokenWriter(out, config=config, vocab_size=spec.vocab.size, resume=resume,
                                    overwrite=overwrite)
        if writer.complete:
            log.info("%s: already complete (%d cells); nothing to do", out, writer.manifest.get("n_cells", 0))
            return {**writer.manifest, "already_complete": True}
        writer.update(inputs=[str(p) for p in paths], gene_match=[rep.to_dict() for _, rep in resolved])
        qc_keep = [None] * len(readers)
        if qc == "genecompass":
            from .qc import file_qc

            # the z-scores need the whole file: one streaming pass per file before tokenizing
            qc_keep, reports = zip(*(file_qc(r, chunk_size=chunk_size) for r in readers))
            writer.update(qc={"mode": qc, "files": [rep.to_dict() for rep in reports]})
        total = sum(r.n_obs for r in readers)
        t0 = time.perf_counter()
        # three stages on their own threads: read (I/O, decompression) -> tokenize (compiled core)
        # -> write (Parquet encoding); all release the GIL for their heavy parts
        with progress(total=total, desc="tokenize", enabled=progress_bar) as bar, \
                cf.ThreadPoolExecutor(1) as read_pool, cf.ThreadPoolExecutor(1) as write_pool:
            pending: cf.Future | None = None
            for fi, (p, r, (col_token, _)) in enumerate(zip(paths, readers, resolved)):
                read_cols = list(dict.fromkeys(
                    want + [c for c in (TOTAL_COLUMN, FILTER_COLUMN, species_column) if c in r.obs_columns]))
                # resume: skip the finished prefix without reading it (shards finish in order)
                first = 0
                while first < r.n_obs and (rec := writer.done(fi, first)) is not None:
                    first = rec["stop"]
                bar.update(first)
                if first >= r.n_obs:
                    continue
                it = r.iter_chunks(start=first, chunk_size=chunk_size, obs_columns=read_cols)
                fut = read_pool.submit(next, it, None)
                while True:
                    chunk = fut.result()
                    if chunk is None:
                        break
                    fut = read_pool.submit(next, it, None)
                    if writer.done(fi, chunk.start) is not None:
                        bar.update(chunk.n_cells)
                        continue
                    keep = None if qc_keep[fi] is None else qc_keep[fi][chunk.start:chunk.stop]
                    table, stats = tokenize_chunk(spec, chunk, col_token, path=str(p), var_names=r.var_names,
                                                  file_index=fi, obs_columns=want, qc_keep=keep)
                    if pending is not None:
                        pending.result()  # keep one shard in flight; surfaces write errors
                    pending = write_pool.submit(writer.write_shard, table, file_index=fi, start=chunk.start,
                                                stop=chunk.stop, stats=stats)
                    pending.add_done_callback(lambda _f, n=chunk.n_cells: bar.update(n))
            if pending is not None:
                pending.result()
        shards = writer.manifest["shards"]
        summ = {k: sum(s.get(k, 0) for s in shards) for k in
                ("n_cells_in", "n_empty", "n_filtered", "n_at_max_len", "counts_total", "counts_matched",
                 "n_qc_dropped")}
        summ["fraction_counts_matched"] = summ["counts_matched"] / max(summ["counts_total"], 1e-300)
        summ["seconds"] = time.perf_counter() - t0
        return writer.finalize(summary=summ)
    finally:
        lock.release()
        for r in readers:
            r.close()


def tokenize_anndata(
    adata,
    *,
    preset: str = "geneformer-v1",
    token_dictionary: str | Path | None = None,
    gene_median: str | Path | None = None,
    gene_name_map: str | Path | None = "auto",
    orthologs: str | Path | None = None,
    gene_id_column: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    max_len: int | None = None,
    chunk_size: int = 10_000,
    backend: str = "auto",
    n_threads: int | None = None,
    min_gene_match: float = 0.2,
    allow_non_integer: bool = False,
    species: str | None = None,
    species_column: str | None = None,
    normalize_total: float | None = None,
    qc: str | None = None,
) -> pa.Table:
    """Tokenize an in-memory AnnData (same semantics and backends as :func:`tokenize_corpus`).

    Parameters
    ----------
    adata
        Cells x genes with raw counts; ``obs["n_counts"]`` is used as the cell total when present,
        and cells with ``obs["filter_pass"] != 1`` are left out.
    preset, token_dictionary, gene_median, gene_name_map, orthologs
        Vocabulary and model layout, as in :func:`tokenize_corpus`.
    gene_id_column, layer, use_raw
        Where gene ids and raw counts are.
    max_len
        Override the preset's model input size.
    chunk_size
        Cells per call of the core (bounds the temporary CSR copy of dense input).
    backend, n_threads
        Core backend and its threads.
    min_gene_match, allow_non_integer
        Input checks, as in :func:`tokenize_corpus`.
    species, species_column, normalize_total, qc
        GeneCompass options, as in :func:`tokenize_corpus` (``qc`` over all cells of ``adata``).

    Returns
    -------
    pyarrow.Table
        ``input_ids`` (list<int32>), ``length``, ``cell_index`` (row in ``adata``); cells without any
        expressed vocabulary gene are absent. The schema metadata records the tokenizer config (special
        tokens, dictionary hashes, orthologs), which :func:`~scfm_fast.embed_tokens` and
        :func:`~scfm_fast.perturb_cells` use as they use a token dataset's manifest.

    Examples
    --------
    >>> import anndata as ad, scfm_fast
    >>> from importlib.resources import files
    >>> adata = ad.read_h5ad(files("scfm_fast") / "data/demo/pbmc_200cells.h5ad")
    >>> tab = scfm_fast.tokenize_anndata(adata)
    >>> tab.num_rows, tab.column("length").to_numpy().max()
    (200, np.int32(2048))
    """
    import scipy.sparse as sp

    from ..readers.base import CellChunk

    _check_options(max_len=None, n_special=0, n_threads=None, chunk_size=chunk_size)
    check_qc_mode(qc)
    spec = TokenizerSpec.build(preset=preset, token_dictionary=token_dictionary, gene_median=gene_median,
                               gene_name_map=gene_name_map, orthologs=orthologs, max_len=max_len,
                               min_gene_match=min_gene_match, allow_non_integer=allow_non_integer,
                               backend=backend, n_threads=n_threads, species=species,
                               species_column=species_column, normalize_total=normalize_total)
    if species_column is not None and species_column not in adata.obs.columns:
        msg = f"species_column {species_column!r} not in obs (available: {list(adata.obs.columns)})"
        raise InputFileError(msg)
    if use_raw:
        if adata.raw is None:
            msg = "use_raw=True but adata.raw is None"
            raise InputFileError(msg)
        X, var = adata.raw.X, adata.raw.var
    elif layer is not None:
        if layer not in adata.layers:
            msg = f"layer {layer!r} not in adata.layers (available: {list(adata.layers)})"
            raise InputFileError(msg)
        X, var = adata.layers[layer], adata.var
    else:
        X, var = adata.X, adata.var
    if gene_id_column is not None and gene_id_column not in var.columns:
        msg = f"gene_id_column {gene_id_column!r} not in var (available: {list(var.columns)})"
        raise InputFileError(msg)
    gene_ids = (var[gene_id_column] if gene_id_column else var.index).astype(str).to_numpy()
    col_token, _ = resolve_genes(gene_ids, spec.vocab, gene_name_map=spec.gene_name_map,
                                 ortholog_map=spec.ortholog_map, min_fraction=min_gene_match, source="adata")
    obs_cols = [c for c in dict.fromkeys((TOTAL_COLUMN, FILTER_COLUMN, species_column)) if c in adata.obs.columns]
    qc_keep = None
    if qc is not None:
        from .qc import matrix_qc

        qc_keep, _ = matrix_qc(X, gene_ids, chunk_size=chunk_size)
    out_cols = ["input_ids", "length", "cell_index"] + (["values", "species"] if spec.values else [])
    tables = []
    for start in range(0, adata.n_obs, chunk_size):
        stop = min(start + chunk_size, adata.n_obs)
        block = X[start:stop]
        block = sp.csr_matrix(block) if not sp.issparse(block) else block.tocsr()
        chunk = CellChunk(start, block.indptr.astype(np.int64), block.indices.astype(np.int32),
                          block.data, adata.obs.iloc[start:stop][obs_cols])
        tab, _ = tokenize_chunk(spec, chunk, col_token, path="adata", var_names=gene_ids,
                                qc_keep=None if qc_keep is None else qc_keep[start:stop])
        tables.append(tab.select(out_cols))
    out = pa.concat_tables(tables) if tables else pa.table(
        {"input_ids": pa.array([], pa.list_(pa.int32())), "length": pa.array([], pa.int32()),
         "cell_index": pa.array([], pa.int64())})
    # embed / perturb read the special tokens, dictionary and orthologs from here, as from a manifest
    return with_table_config(out, spec.config)
