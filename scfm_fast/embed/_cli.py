"""``scfm embed``: cell (and gene) embeddings of a token dataset, to Parquet and NumPy, resumable.

Output directory layout::

    OUT/embed_info.json                 settings, status ("running" / "complete"), counts
    OUT/parts/part-PPPPPP.parquet       embeddings of cells [P*N, (P+1)*N) of the token dataset
    OUT/parts/part-PPPPPP.genes.npz     that part's per-gene sums and counts (with --genes)
    OUT/cell_embeddings.parquet         cell_index, file_index, the dataset's metadata columns, embedding
    OUT/cell_embeddings.npy             float32 (n_cells, hidden), the same rows
    OUT/gene_embeddings.parquet         token, ensembl_id, n, embedding (with --genes)
    OUT/cell_embeddings_pca.png         PC1/PC2 coloured by --plot COLUMN (with --plot)

Cells come from :func:`~scfm_fast.store.cells.open_cells` (an unfinished or empty dataset is refused) and
the parts follow :class:`~scfm_fast._runs.PartitionedRun`: memory is bounded by ``--cells-per-part``, every
file is written under a temporary name and renamed into place, so a part exists only when complete and
``--resume`` continues an interrupted run; under torchrun each rank writes its share of the parts.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

from .._errors import InputFileError, StoreError, UsageError

_CONFIG_KEYS = ("model", "layer", "pool", "genes", "dtype", "cells_per_part", "no_attention_mask")
_MERGED = ("cell_embeddings.parquet", "cell_embeddings.npy", "gene_embeddings.parquet", "cell_embeddings_pca.png")


def register(subparsers: Any) -> None:
    """Add the ``embed`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("embed", help="cell / gene embeddings of a token dataset",
                              description="Embed every cell of TOKENS_DIR with a Geneformer (Hugging Face BERT) or GeneCompass "
                                          "checkpoint (GeneCompass tokens: --preset genecompass); "
                                          "writes OUT/cell_embeddings.parquet (with the dataset's metadata "
                                          "columns) and .npy, and gene_embeddings.parquet with --genes.")
    p.add_argument("tokens", metavar="TOKENS_DIR")
    p.add_argument("--model", required=True,
                   help="checkpoint directory (config.json + weights): Geneformer (BERT) or GeneCompass")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layer", type=int, default=-1, help="hidden layer (-1 last, -2 second to last, 0 embeddings)")
    p.add_argument("--pool", default="mean", choices=["mean", "cls"],
                   help="mean over genes, or the first row: <cls> (Geneformer V2) / the species row (GeneCompass)")
    p.add_argument("--no-attention-mask", action="store_true",
                   help="GeneCompass only: pad each cell to the model's positions (2,048) and let the pads attend, "
                        "as GeneCompass's own scripts do, to reproduce their numbers (off: pads never attend)")
    p.add_argument("--genes", action="store_true", help="also write per-gene embeddings")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-tokens", type=int, default=None)
    p.add_argument("--cells-per-part", type=int, default=100_000,
                   help="cells embedded and written per part (bounds memory; the unit of --resume)")
    p.add_argument("--plot", metavar="COLUMN", default=None,
                   help="also plot PC1/PC2 coloured by this metadata column ('length' for tokens per cell)")
    p.add_argument("--token-dictionary", default=None, metavar="PKL",
                   help="the dictionary TOKENS_DIR was tokenized with, to name genes in gene_embeddings.parquet "
                        "when it is not a bundled one (checked against the dataset's manifest)")
    p.add_argument("--resume", action="store_true", help="keep finished parts of an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace the results in --out")
    p.set_defaults(func=run)


def _check_options(args: Any) -> None:
    """Option values argparse cannot check, before anything is read or written."""
    for flag, value in (("--cells-per-part", args.cells_per_part), ("--batch-tokens", args.batch_tokens)):
        if value is not None and value < 1:
            msg = f"{flag} {value}: must be at least 1"
            raise UsageError(msg)
    if not Path(args.tokens).is_dir():  # a run's resume check needs the dataset's manifest
        msg = (f"{args.tokens}: not a token dataset directory; pass the --out of `scfm tokenize` (a table from "
               "tokenize_anndata embeds with scfm_fast.embed_tokens)")
        raise InputFileError(msg)
    tokens, out = Path(args.tokens).resolve(), Path(args.out).resolve()
    if out == tokens or tokens in out.parents:  # our Parquet files would then be read as token shards
        msg = f"--out {args.out} is inside TOKENS_DIR {args.tokens}; write the embeddings somewhere else"
        raise UsageError(msg)


def _device(name: str | None, rank: int | None = None) -> Any:
    """``--device`` as a torch device (default: cuda if available; under torchrun this rank's local GPU)."""
    import torch

    from .._devices import parse_device

    if name is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda" if rank is None else f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}")
    return parse_device(name, flag="--device")


def run(args: Any) -> int:
    import numpy as np
    import pyarrow as pa

    from .._progress import progress
    from .._runs import PartitionedRun, rank_world
    from ..model.checkpoint import load_encoder
    from ..store.cells import open_cells
    from .cells import check_inputs, embed_tokens
    from .genecompass import is_genecompass

    _check_options(args)
    src = open_cells(args.tokens)  # refuses a missing, unfinished, damaged or empty dataset
    dictionary = _check_dictionary(args.token_dictionary, src)
    n = len(src)
    cpp = int(args.cells_per_part)
    n_parts = max(1, math.ceil(n / cpp))
    # every metadata column but the tokens (a corpus's token column can be tens of GB) and the identity
    meta = src.columns([c for c in src.column_names if c not in ("cell_index", "file_index")])
    if args.plot and args.plot not in meta.column_names:
        msg = (f"{args.tokens}: no metadata column {args.plot!r} to plot (have {meta.column_names}); tokenize with "
               f"--obs-columns {args.plot}")
        raise InputFileError(msg)
    rank, world = rank_world()
    device = _device(args.device, rank if world > 1 else None)
    # the model and its fit to the tokens (positions, vocabulary, <cls>) are checked before --out is touched
    model = load_encoder(args.model, device=device)
    hidden = model.config.hidden_size
    check_inputs(src, model, layer=args.layer, pooling=args.pool, no_attention_mask=args.no_attention_mask)
    if args.token_dictionary is not None and is_genecompass(model):  # ids of another dictionary version name other genes
        from ..model.genecompass_checkpoint import check_token_dictionary

        check_token_dictionary(model, dictionary)
    cfg = {k: getattr(args, k) for k in _CONFIG_KEYS}
    cfg.update(tokens=str(Path(args.tokens).resolve()), model=str(Path(args.model).resolve()), n_cells=n,
               tokens_config=src.manifest.get("config_hash"))  # re-tokenized in place: parts don't mix
    out = Path(args.out)
    job = PartitionedRun(out, config=cfg, n_parts=n_parts, info_name="embed_info.json", outputs=_MERGED,
                         resume=args.resume, overwrite=args.overwrite, rank=rank, world=world, command="scfm embed")
    job.begin()
    todo = job.todo()
    if todo:
        bar = progress(total=sum(min(cpp, n - p * cpp) for p in todo), desc="embed", unit="cells", enabled=True)
        for p in todo:
            s, e = p * cpp, min(n, (p + 1) * cpp)
            part = src.subset(np.arange(s, e))
            emb, gene = embed_tokens(part, model, layer=args.layer, pooling=args.pool, genes=args.genes,
                                     batch_tokens=args.batch_tokens, device=device, dtype=args.dtype,
                                     progress_bar=False, no_attention_mask=args.no_attention_mask)
            cols = {"cell_index": part.cell_index, "file_index": part.file_index}
            cols.update({c: meta.column(c).slice(s, e - s) for c in meta.column_names})
            cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), hidden)
            side = None
            if gene is not None:  # sums, so parts add up to means over every occurrence
                side = {".genes.npz": lambda t, g=gene: _save_npz(
                    t, token=g["token"], n=g["n"], sum=g["embedding"].astype(np.float64) * g["n"][:, None])}
            job.write_part(p, lambda t, c=cols: _write_parquet(pa.table(c), t), side=side)
            bar.update(e - s)
        bar.close()
    with job.merging() as mine:
        if not mine:  # another rank merges, or parts of other ranks are still being written
            print(f"{out}: rank {rank} wrote its parts; the last rank to finish merges", file=sys.stderr)
            return 0
        job.check_merge_ready()
        n_empty = _merge(out, job.part_paths(), args, n, hidden, src)
        job.complete(n_cells=n, n_cells_without_genes=n_empty, n_parts=n_parts, device=str(device),
                     token_dictionary=dictionary,
                     # the keys of earlier versions, kept for scripts that read them
                     tokens=cfg["tokens"], model=cfg["model"], layer=args.layer, pooling=args.pool, dtype=args.dtype)
    print(f"wrote {n:,} cell embeddings to {out}" + (f" ({n_empty:,} cells without genes are NaN)" if n_empty else ""),
          file=sys.stderr)
    return 0


def _write_parquet(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path)


def _save_npz(path: Path, **arrays: Any) -> None:
    import numpy as np

    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
        np.savez(f, **arrays)


def _merge(out: Path, names: list[Path], args: Any, n: int, hidden: int, src: Any) -> int:
    """Parts -> cell_embeddings.parquet / .npy (streamed), gene_embeddings.parquet, the plot."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .._runs import atomic_write

    schema = pq.read_schema(names[0])
    npy = out / "cell_embeddings.npy"
    tmp_npy, tmp_pq = (out / f".{f}.{os.getpid()}.tmp" for f in ("cell_embeddings.npy", "cell_embeddings.parquet"))
    try:
        mm = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32, shape=(n, hidden))
        row = 0
        with pq.ParquetWriter(tmp_pq, schema) as w:
            for p in names:
                t = pq.read_table(p)
                w.write_table(t)
                emb = t.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, hidden)
                mm[row:row + len(emb)] = emb
                row += len(emb)
        if row != n:
            msg = f"{out}: the parts hold {row:,} cells, the token dataset {n:,}; rerun with --overwrite"
            raise StoreError(msg)
        mm.flush()
        del mm
        os.replace(tmp_pq, out / "cell_embeddings.parquet")
        os.replace(tmp_npy, npy)
    finally:  # a failed merge leaves no temporaries behind
        tmp_npy.unlink(missing_ok=True)
        tmp_pq.unlink(missing_ok=True)
    emb = np.load(npy, mmap_mode="r")
    n_empty = int((~np.isfinite(emb).all(axis=1)).sum())
    if args.genes:
        _merge_genes(out, names, src, hidden, args.token_dictionary)
    if args.plot:
        from .plot import plot_embedding_pca

        col = pq.read_table(out / "cell_embeddings.parquet", columns=[args.plot]).column(args.plot)
        color = col.to_numpy(zero_copy_only=False)
        if pa.types.is_dictionary(col.type) or pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            color = np.asarray(col.cast(pa.string()).to_pylist(), dtype=object)
        atomic_write(out / "cell_embeddings_pca.png", lambda t: plot_embedding_pca(
            np.asarray(emb), color, t, label=args.plot, title=f"Cell embeddings, layer {args.layer}, {args.pool} pooling"))
    return n_empty


def _merge_genes(out: Path, names: list[Path], src: Any, hidden: int, token_dictionary: str | None) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .._runs import atomic_write

    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for p in names:
        with np.load(p.with_suffix(".genes.npz")) as z:
            for t, c, s in zip(z["token"].tolist(), z["n"].tolist(), z["sum"]):
                counts[t] = counts.get(t, 0) + c
                sums[t] = sums[t] + s if t in sums else s.copy()
    tok = np.array(sorted(counts), dtype=np.int64)
    cnt = np.array([counts[t] for t in tok], dtype=np.int64)
    mean = (np.stack([sums[t] for t in tok]) / cnt[:, None]).astype(np.float32) if tok.size else \
        np.zeros((0, hidden), np.float32)
    gene_of = _gene_names(src, token_dictionary)
    names_col = pa.array([gene_of.get(int(t), "") for t in tok], pa.string())  # typed even when empty
    table = pa.table({"token": tok, "ensembl_id": names_col, "n": cnt,
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(mean.ravel()), hidden)})
    atomic_write(out / "gene_embeddings.parquet", lambda t: pq.write_table(table, t))


def _bundled_vocab(src: Any) -> Any:
    """The preset's bundled vocabulary when the tokens were made with it, else ``None``."""
    from ..vocab import GeneVocab

    try:
        vocab = GeneVocab.load(preset=src.preset or "geneformer-v1")
    except Exception:  # noqa: BLE001 - no bundled set for this preset (V2): not bundled
        return None
    return vocab if vocab.hashes["token_dictionary"] == src.dictionary_hash else None


def _check_dictionary(path: str | None, src: Any) -> str:
    """Which token dictionary the tokens use, as recorded in embed_info.json.

    ``--token-dictionary`` must be the one the tokens were made with (else wrong gene names); without it,
    tokens from a dictionary scfm_fast does not bundle get a warning: the model must have been trained
    with that dictionary, which nothing here can check.
    """
    from ..vocab.dictionaries import check_token_dictionary

    if path is not None:
        if not Path(path).is_file():
            msg = f"{path}: --token-dictionary not found"
            raise InputFileError(msg)
        check_token_dictionary(path, src.dictionary_hash, dataset=src.name)
        return str(Path(path).resolve())
    if _bundled_vocab(src) is not None:
        return f"bundled ({src.preset or 'geneformer-v1'})"
    recorded = src.dictionary_hash
    print(f"warning: {src.name}: tokens made with a token dictionary scfm_fast does not bundle "
          f"(sha256 {str(recorded)[:12]}…); the model must have been trained with that same dictionary. Pass "
          "--token-dictionary PKL (checked against the dataset) to confirm it and to name genes", file=sys.stderr)
    return f"not bundled (sha256 {recorded})"


def _gene_names(src: Any, token_dictionary: str | None = None) -> dict[int, str]:
    """Token id -> gene id from ``token_dictionary`` (checked against the manifest before the run), else from
    the preset's bundled dictionary if the tokens were made with it."""
    from ..vocab.dictionaries import load_pickle_dict

    if token_dictionary is not None:
        d = load_pickle_dict(token_dictionary, what="token dictionary")
        return {int(v): str(k) for k, v in d.items() if not str(k).startswith("<")}
    vocab = _bundled_vocab(src)
    if vocab is None:
        # a custom --token-dictionary: the bundled one would put wrong names on its token ids
        print(f"{src.name}: gene_embeddings.parquet has empty ensembl_id: pass --token-dictionary PKL (the one "
              "used by scfm tokenize) to name genes", file=sys.stderr)
        return {}
    return vocab.gene_of_token
