"""``scfm embed``: cell (and gene) embeddings of a token dataset, to Parquet and NumPy, resumable.

Output directory layout::

    OUT/embed_info.json                 settings, status ("running" / "complete"), counts
    OUT/parts/part-PPPPPP.parquet       embeddings of cells [P*N, (P+1)*N) of the token dataset
    OUT/parts/part-PPPPPP.genes.npz     that part's per-gene sums and counts (with --genes)
    OUT/cell_embeddings.parquet         cell_index, file_index, the dataset's metadata columns, embedding
    OUT/cell_embeddings.npy             float32 (n_cells, hidden), the same rows
    OUT/gene_embeddings.parquet         token, ensembl_id, n, embedding (with --genes)
    OUT/cell_embeddings_pca.png         PC1/PC2 coloured by --plot COLUMN (with --plot)

Memory is bounded by ``--cells-per-part``; every file is written under a temporary name and renamed
into place, so a part exists only when complete and ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from .._errors import InputFileError, StoreError, UsageError

_CONFIG_KEYS = ("model", "layer", "pool", "genes", "dtype", "cells_per_part")
_MERGED = ("cell_embeddings.parquet", "cell_embeddings.npy", "gene_embeddings.parquet", "cell_embeddings_pca.png")


def register(subparsers: Any) -> None:
    """Add the ``embed`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("embed", help="cell / gene embeddings of a token dataset",
                              description="Embed every cell of TOKENS_DIR with a Hugging Face BERT checkpoint; "
                                          "writes OUT/cell_embeddings.parquet (with the dataset's metadata "
                                          "columns) and .npy, and gene_embeddings.parquet with --genes.")
    p.add_argument("tokens", metavar="TOKENS_DIR")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + weights)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layer", type=int, default=-1, help="hidden layer (-1 last, -2 second to last, 0 embeddings)")
    p.add_argument("--pool", default="mean", choices=["mean", "cls"])
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


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _atomic(path, lambda t: t.write_text(json.dumps(obj, indent=1, default=str)))


def _metadata(tokens: str, store: Any):
    """The dataset's per-cell columns other than the tokens, in the store's cell order."""
    import numpy as np
    import pyarrow.dataset as ds

    from ..store import read_table

    names = [c for c in ds.dataset(str(tokens), format="parquet", exclude_invalid_files=True).schema.names
             if c != "input_ids"]  # never the tokens: a corpus's token column can be tens of GB
    meta = read_table(tokens, columns=names)
    if "cell_index" in meta.column_names and "file_index" in meta.column_names:
        same = (np.array_equal(meta.column("cell_index").to_numpy(), np.asarray(store.cell_index))
                and np.array_equal(meta.column("file_index").to_numpy(), np.asarray(store.file_index)))
        if not same:
            msg = f"{tokens}: the Parquet shards and the packed store list cells in different orders; re-tokenize"
            raise StoreError(msg)
        meta = meta.drop_columns(["cell_index", "file_index"])
    return meta


def _check_options(args: Any) -> None:
    """Option values argparse cannot check, before anything is read or written."""
    for flag, value in (("--cells-per-part", args.cells_per_part), ("--batch-tokens", args.batch_tokens)):
        if value is not None and value < 1:
            msg = f"{flag} {value}: must be at least 1"
            raise UsageError(msg)
    tokens, out = Path(args.tokens).resolve(), Path(args.out).resolve()
    if out == tokens or tokens in out.parents:  # our Parquet files would then be read as token shards
        msg = f"--out {args.out} is inside TOKENS_DIR {args.tokens}; write the embeddings somewhere else"
        raise UsageError(msg)


def _device(name: str | None) -> Any:
    """``--device`` as a torch device (default: cuda if available)."""
    import torch

    from .._devices import parse_device

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(name, flag="--device")


def run(args: Any) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .._progress import progress
    from ..model.checkpoint import load_encoder
    from ..store import TokenStore
    from .cells import TokenSource, check_inputs, embed_tokens

    _check_options(args)
    store = TokenStore(args.tokens)
    _check_dictionary(args.token_dictionary, store.manifest.get("config", {}), args.tokens)
    n = len(store)
    cpp = int(args.cells_per_part)
    n_parts = max(1, math.ceil(n / cpp))
    meta = _metadata(args.tokens, store)
    if args.plot and args.plot not in meta.column_names:
        msg = (f"{args.tokens}: no metadata column {args.plot!r} to plot (have {meta.column_names}); tokenize with "
               f"--obs-columns {args.plot}")
        raise InputFileError(msg)
    device = _device(args.device)
    # the model and its fit to the tokens are checked before --out is touched
    model = load_encoder(args.model, device=device)
    hidden = model.config.hidden_size
    lengths = store.lengths
    check_inputs(TokenSource(store.__getitem__, lengths, np.asarray(store.cell_index), _specials(store), args.tokens),
                 model, layer=args.layer, pooling=args.pool)
    out = Path(args.out)
    parts = out / "parts"
    cfg = {k: getattr(args, k) for k in _CONFIG_KEYS}
    cfg.update(tokens=str(Path(args.tokens).resolve()), model=str(Path(args.model).resolve()), n_cells=n,
               tokens_config=store.manifest.get("config_hash"))  # re-tokenized in place: parts don't mix
    info_path = out / "embed_info.json"
    names = [parts / f"part-{p:06d}.parquet" for p in range(n_parts)]
    results = [*parts.glob("part-*"), *(out / f for f in _MERGED)]
    if args.overwrite:  # embed_info.json first, so an interrupted --overwrite never reads "complete"
        for f in (info_path, *results):
            f.unlink(missing_ok=True)
    elif info_path.exists():
        old = json.loads(info_path.read_text()).get("config", {})
        if old != cfg and any(f.exists() for f in results):  # a run that wrote nothing holds nothing to lose
            diff = {k: (old.get(k), v) for k, v in cfg.items() if old.get(k) != v}
            msg = f"{out}: holds embeddings made with other settings {diff}; use another --out or --overwrite"
            raise StoreError(msg)
        if not args.resume and any(p.exists() for p in names):
            msg = f"{out}: holds (part of) an earlier run; pass --resume to continue it or --overwrite"
            raise StoreError(msg)
    parts.mkdir(parents=True, exist_ok=True)
    _write_json(info_path, {"config": cfg, "status": "running"})

    todo = [p for p in range(n_parts) if not names[p].exists()]
    if todo:
        bar = progress(total=sum(min(cpp, n - p * cpp) for p in todo), desc="embed", unit="cells", enabled=True)
        for p in todo:
            s, e = p * cpp, min(n, (p + 1) * cpp)
            src = TokenSource(lambda i, s=s: store[s + i], lengths[s:e], np.asarray(store.cell_index[s:e]),
                              _specials(store))
            emb, gene = embed_tokens(src, model, layer=args.layer, pooling=args.pool, genes=args.genes,
                                     batch_tokens=args.batch_tokens, device=device, dtype=args.dtype,
                                     progress_bar=False)
            cols = {"cell_index": np.asarray(store.cell_index[s:e]), "file_index": np.asarray(store.file_index[s:e])}
            cols.update({c: meta.column(c).slice(s, e - s) for c in meta.column_names})
            cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), hidden)
            if gene is not None:  # sums, so parts add up to means over every occurrence
                _atomic(names[p].with_suffix(".genes.npz"), lambda t, g=gene: _save_npz(
                    t, token=g["token"], n=g["n"], sum=g["embedding"].astype(np.float64) * g["n"][:, None]))
            _atomic(names[p], lambda t, c=cols: pq.write_table(pa.table(c), t))
            bar.update(e - s)
        bar.close()
    n_empty = _merge(out, names, args, n, hidden)
    summary = {"n_cells": n, "n_cells_without_genes": n_empty, "n_parts": n_parts}
    _write_json(info_path, {"config": cfg, "status": "complete", "device": str(device), **summary,
                            # the keys of earlier versions, kept for scripts that read them
                            "tokens": cfg["tokens"], "model": cfg["model"], "layer": args.layer,
                            "pooling": args.pool, "dtype": args.dtype})
    print(f"wrote {n:,} cell embeddings to {out}" + (f" ({n_empty:,} cells without genes are NaN)" if n_empty else ""),
          file=sys.stderr)
    return 0


def _specials(store: Any) -> tuple[int, ...] | None:
    spec = store.manifest.get("config", {}).get("special_tokens")
    return tuple(int(v) for v in spec.values()) if spec else None


def _save_npz(path: Path, **arrays: Any) -> None:
    import numpy as np

    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
        np.savez(f, **arrays)


def _merge(out: Path, names: list[Path], args: Any, n: int, hidden: int | None) -> int:
    """Parts -> cell_embeddings.parquet / .npy (streamed), gene_embeddings.parquet, the plot."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = [p.name for p in names if not p.exists()]
    if missing:
        msg = f"{out}: parts {missing[:5]} are missing; rerun with --resume"
        raise StoreError(msg)
    schema = pq.read_schema(names[0])
    hidden = hidden or schema.field("embedding").type.list_size
    npy = out / "cell_embeddings.npy"
    tmp_npy = out / ".cell_embeddings.npy.tmp"
    mm = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32, shape=(n, hidden))
    tmp_pq = out / ".cell_embeddings.parquet.tmp"
    row = 0
    with pq.ParquetWriter(tmp_pq, schema) as w:
        for p in names:
            t = pq.read_table(p)
            w.write_table(t)
            emb = t.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, hidden)
            mm[row:row + len(emb)] = emb
            row += len(emb)
    mm.flush()
    del mm
    os.replace(tmp_pq, out / "cell_embeddings.parquet")
    os.replace(tmp_npy, npy)
    emb = np.load(npy, mmap_mode="r")
    n_empty = int((~np.isfinite(emb).all(axis=1)).sum())
    if args.genes:
        _merge_genes(out, names, args.tokens, hidden, args.token_dictionary)
    if args.plot:
        from .plot import plot_embedding_pca

        col = pq.read_table(out / "cell_embeddings.parquet", columns=[args.plot]).column(args.plot)
        color = col.to_numpy(zero_copy_only=False)
        if pa.types.is_dictionary(col.type) or pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            color = np.asarray(col.cast(pa.string()).to_pylist(), dtype=object)
        _atomic(out / "cell_embeddings_pca.png", lambda t: plot_embedding_pca(
            np.asarray(emb), color, t, label=args.plot, title=f"Cell embeddings, layer {args.layer}, {args.pool} pooling"))
    return n_empty


def _merge_genes(out: Path, names: list[Path], tokens: str, hidden: int, token_dictionary: str | None) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..store import read_manifest

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
    gene_of = _gene_names(read_manifest(tokens)["config"], tokens, token_dictionary)
    names_col = pa.array([gene_of.get(int(t), "") for t in tok], pa.string())  # typed even when empty
    table = pa.table({"token": tok, "ensembl_id": names_col, "n": cnt,
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(mean.ravel()), hidden)})
    _atomic(out / "gene_embeddings.parquet", lambda t: pq.write_table(table, t))


def _check_dictionary(path: str | None, config: dict, tokens: str) -> None:
    """``--token-dictionary`` must be the dictionary the tokens were made with (else wrong gene names)."""
    if path is None:
        return
    from ..vocab.dictionaries import check_token_dictionary

    if not Path(path).is_file():
        msg = f"{path}: --token-dictionary not found"
        raise InputFileError(msg)
    check_token_dictionary(path, config.get("dictionary_hashes", {}).get("token_dictionary"), dataset=tokens)


def _gene_names(config: dict, tokens: str, token_dictionary: str | None = None) -> dict[int, str]:
    """Token id -> gene id from ``token_dictionary`` (checked against the manifest before the run), else from
    the preset's bundled dictionary if the tokens were made with it."""
    from ..vocab import GeneVocab
    from ..vocab.dictionaries import load_pickle_dict

    if token_dictionary is not None:
        d = load_pickle_dict(token_dictionary, what="token dictionary")
        return {int(v): str(k) for k, v in d.items() if not str(k).startswith("<")}
    try:
        vocab = GeneVocab.load(preset=config.get("preset", "geneformer-v1"))
    except Exception:  # noqa: BLE001 - names are a convenience; tokens are the key
        vocab = None
    if vocab is None or vocab.hashes["token_dictionary"] != config.get("dictionary_hashes", {}).get("token_dictionary"):
        # a custom --token-dictionary: the bundled one would put wrong names on its token ids
        print(f"{tokens}: tokens made with a token dictionary scfm_fast does not bundle; gene_embeddings.parquet "
              "has empty ensembl_id: pass --token-dictionary PKL (the one used by scfm tokenize) to name genes",
              file=sys.stderr)
        return {}
    return vocab.gene_of_token
