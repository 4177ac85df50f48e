"""``scfm``: command-line entry point (thin over the Python API)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__
from ._errors import ScfmError
from ._lock import output_lock

#: commands whose --out is locked here for the whole run (tokenize locks inside tokenize_corpus, so
#: that the Python API is covered too); a command that resumes keeps its finished part after a failure
_LOCKED = ("medians", "embed", "perturb", "pretrain")
_RESUMABLE = ("tokenize", "embed", "perturb", "pretrain")
#: commands that make no BLAS call (NumPy/SciPy's OpenBLAS gets one thread for them)
_NO_BLAS = ("tokenize", "medians")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _add_tokenize(sub) -> None:
    p = sub.add_parser("tokenize", help="rank-value tokenize .h5ad / AnnData-Zarr / .loom files",
                       description="Stream cells from INPUT files into a token dataset directory "
                                   "(Parquet shards + packed tokens + manifest).")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="input files; with --merge, the shard output directories to join")
    p.add_argument("--out", help="output directory")
    p.add_argument("--shard", metavar="K/N", help="take only every N-th input, starting with the K-th (1-based); "
                                                  "one of N jobs whose outputs --merge joins")
    p.add_argument("--merge", metavar="OUT", help="join the shard outputs given as INPUT into one dataset OUT "
                                                  "(Parquet shards linked, not rewritten)")
    p.add_argument("--gene-mapping-file", metavar="PKL",
                   help="Geneformer gene mapping pickle (id -> vocabulary Ensembl id): ids upper-cased and "
                        "mapped, counts of ids mapping onto one gene summed, unmapped ids dropped")
    p.add_argument("--keep-counts", action="store_true",
                   help="add a 'counts' column: normalised counts in rank order (Geneformer's keep_counts)")
    p.add_argument("--preset", default="geneformer-v1",
                   choices=["geneformer-v1", "geneformer-v2", "mouse-geneformer", "genecompass"])
    p.add_argument("--token-dictionary", help="token dictionary pickle (default: the preset's bundled one)")
    p.add_argument("--gene-median", help="gene median dictionary pickle (default: the preset's bundled one)")
    p.add_argument("--gene-name-map", default="auto",
                   help="symbol->Ensembl table (.pkl/.csv) matching the token dictionary; 'auto' = the preset's "
                        "own table (mouse-geneformer, genecompass), else the bundled V1 table with V1's "
                        "dictionary (off with any other), 'none' = off")
    p.add_argument("--orthologs", help="'mouse-to-human' (bundled one-to-one orthologs) or a table path")
    p.add_argument("--gene-id-column", help="var column with gene ids ('index': the var index; default: "
                                            "var['ensembl_id'] when present, else the var index, refused when "
                                            "another var column matches clearly better)")
    p.add_argument("--allow-case-insensitive", action="store_true",
                   help="accept genes that match human symbols only when case is ignored (else mouse-looking "
                        "input needs --orthologs)")
    p.add_argument("--layer", help="layer holding raw counts (default: X)")
    p.add_argument("--use-raw", action="store_true", help="read raw/X")
    p.add_argument("--obs-columns", type=_csv, default=[], help="cell metadata columns to carry, a,b,c")
    p.add_argument("--workers", type=int, default=None, help="worker processes, each reading, ranking and writing whole chunks (default: one per core, at most 8, for inputs of 40,000 cells or more; 1: one process with the core on all cores)")
    p.add_argument("--chunk-size", type=int, default=10_000, help="cells per chunk / shard")
    p.add_argument("--max-len", type=int, default=None, help="override the preset's input size")
    p.add_argument("--backend", default="auto", choices=["auto", "cpp", "numba", "reference"])
    p.add_argument("--min-gene-match", type=float, default=0.2)
    p.add_argument("--allow-non-integer", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    g = p.add_argument_group("GeneCompass (--preset genecompass)")
    g.add_argument("--species", choices=["human", "mouse"], help="species of every cell (0 human, 1 mouse)")
    g.add_argument("--species-column", help="obs column holding each cell's species (human/mouse or 0/1)")
    g.add_argument("--normalize-total", type=float, nargs="?", const=10_000.0, default=None, metavar="TARGET",
                   help="values with a library-size step: count / total x TARGET (default 10000) / median")
    p.add_argument("--qc", choices=["genecompass"], help="drop cells by GeneCompass's QC, within each file")
    p.set_defaults(func=_run_tokenize)


def _run_merge(args) -> int:
    from .store.merge import merge_token_datasets

    man = merge_token_datasets(args.inputs, args.merge, overwrite=args.overwrite)
    print(f"merged {len(args.inputs)} shard outputs into {args.merge}: {man['n_cells']:,} cells, "
          f"{man['n_tokens']:,} tokens from {len(man['inputs']):,} input files", file=sys.stderr)
    return 0


def _run_tokenize(args) -> int:
    from ._errors import UsageError
    from .tokenizer.pipeline import tokenize_corpus

    if args.merge is not None:
        if args.out is not None or args.shard is not None:
            msg = "--merge OUT joins shard outputs; it takes no --out or --shard (INPUT are the shard outputs)"
            raise UsageError(msg)
        return _run_merge(args)
    if args.out is None:
        msg = "--out is required (or --merge OUT to join shard outputs)"
        raise UsageError(msg)
    gmap = None if args.gene_name_map in ("none", "") else args.gene_name_map
    man = tokenize_corpus(args.inputs, args.out, preset=args.preset, token_dictionary=args.token_dictionary,
                          gene_median=args.gene_median, gene_name_map=gmap, orthologs=args.orthologs,
                          gene_id_column=args.gene_id_column, layer=args.layer, use_raw=args.use_raw,
                          obs_columns=args.obs_columns, chunk_size=args.chunk_size, max_len=args.max_len,
                          n_threads=args.workers, backend=args.backend, min_gene_match=args.min_gene_match,
                          allow_non_integer=args.allow_non_integer, resume=args.resume,
                          overwrite=args.overwrite, allow_case_insensitive=args.allow_case_insensitive,
                          gene_mapping_file=args.gene_mapping_file, keep_counts=args.keep_counts,
                          shard=args.shard, species=args.species, species_column=args.species_column,
                          normalize_total=args.normalize_total, qc=args.qc)
    s = man["summary"]
    if man.get("already_complete"):
        print(f"{args.out}: already complete ({man['n_cells']:,} cells, {man['n_tokens']:,} tokens); nothing to do",
              file=sys.stderr)
        return 0
    for p, gm in zip(man["inputs"], man["gene_match"]):
        src = f" (ids from {gm['id_source']})" if gm.get("id_source") else ""
        print(f"{p}: {gm['n_matched_genes']:,}/{gm['n_input_genes']:,} genes matched{src} "
              f"({gm['fraction_matched']:.1%}; {gm['n_input_genes'] - gm['n_matched_genes']:,} dropped)",
              file=sys.stderr)
    print(f"wrote {man['n_cells']:,} cells, {man['n_tokens']:,} tokens to {args.out} "
          f"({s['n_empty']:,} cells without expressed genes and {s['n_filtered']:,} with filter_pass != 1 "
          f"skipped; {s['fraction_counts_matched']:.1%} of counts matched; "
          f"{s['n_cells_in'] / max(s['seconds'], 1e-9):,.0f} cells/s)", file=sys.stderr)
    if man.get("qc"):
        print(f"--qc {man['qc']['mode']}: {s.get('n_qc_dropped', 0):,} cells dropped", file=sys.stderr)
    return 0


def _add_medians(sub) -> None:
    p = sub.add_parser("medians", help="corpus gene medians (one streaming pass) -> Geneformer dictionaries")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, help="output directory for gene_median_dictionary.pkl etc.")
    p.add_argument("--gene-id-column")
    p.add_argument("--layer")
    p.add_argument("--use-raw", action="store_true")
    p.add_argument("--chunk-size", type=int, default=10_000)
    p.add_argument("--bins-per-octave", type=int, default=64,
                   help="histogram resolution; relative error <= 2**(1/N)-1")
    p.add_argument("--allow-non-integer", action="store_true", help="accept fractional counts")
    p.add_argument("--special-tokens", type=_csv, default=["<pad>", "<mask>"],
                   help="special tokens of the written token dictionary, in id order")
    p.set_defaults(func=_run_medians)


def _run_medians(args) -> int:
    from .tokenizer.medians import compute_gene_medians, write_gene_dictionaries

    med, report = compute_gene_medians(args.inputs, gene_id_column=args.gene_id_column, layer=args.layer,
                                       use_raw=args.use_raw, chunk_size=args.chunk_size,
                                       bins_per_octave=args.bins_per_octave,
                                       allow_non_integer=args.allow_non_integer)
    paths = write_gene_dictionaries(med, args.out, special_tokens=args.special_tokens)
    rep = {k: v for k, v in report.items() if k != "n_nonzero_cells"}
    (paths["gene_median"].parent / "medians_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({**rep, **{k: str(v) for k, v in paths.items()}}, indent=1))
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions and which fast paths are available here")
    p.add_argument("--part", choices=["tokenizer", "model"],
                   help="only the tokenizer part (never imports torch) or the model part (torch, attention)")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    info = importlib.import_module("scfm_fast.info")  # the model part imports torch only when it runs
    print(info.info_text(parts=(args.part,) if args.part else info.PARTS))
    return 0


# subcommands owned by other subpackages register themselves through ``register(subparsers)``
_PLUGINS = ("scfm_fast.embed._cli", "scfm_fast.perturb._cli", "scfm_fast.pretrain._cli")
#: subcommands defined here; running one of them skips importing the plugins (which import torch)
_LIGHT = ("tokenize", "medians", "info")


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(*, command: str | None = None) -> argparse.ArgumentParser:
    """The ``scfm`` argument parser; with ``command`` one of the light subcommands, without the plugins
    (so that ``scfm tokenize`` starts without importing torch)."""
    parser = argparse.ArgumentParser(prog="scfm", description="scfm_fast: fast single-cell foundation models")
    parser.add_argument("--version", action="version", version=f"scfm_fast {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tokenize(sub)
    _add_medians(sub)
    for mod in () if command in _LIGHT else _PLUGINS:
        try:
            importlib.import_module(mod).register(sub)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    _add_info(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(command=_command_of(argv)).parse_args(argv)
    if args.command in _NO_BLAS and "numpy" not in sys.modules:
        # OpenBLAS (loaded with NumPy/SciPy) starts one thread per core that spin-wait between calls,
        # on the cores the workers need: ~1% of a 2-core tokenize run's CPU, for no BLAS call at all
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with _out_lock(args):
            return int(args.func(args) or 0)
    except ScfmError as e:
        print(f"scfm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"scfm {args.command}: error: {os_error_message(e, command=args.command)}", file=sys.stderr)
        return 2


def _out_lock(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    out = getattr(args, "out", None)
    # torchrun starts one `scfm perturb` per rank: rank 0 holds the lock for all of them
    if args.command not in _LOCKED or not out or os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    if os.path.exists(out) and not os.path.isdir(out):
        return contextlib.nullcontext()  # the command itself reports "--out is a file"
    return output_lock(out, command=args.command)


_FIXES = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free space in your quota",
          errno.EACCES: "fix the permissions (or choose another --out)",
          errno.EPERM: "fix the permissions (or choose another --out)",
          errno.EROFS: "choose a writable --out", errno.ENOENT: "check that the path still exists",
          errno.EMFILE: "raise the open-file limit (e.g. ulimit -n 65536)",
          errno.ENFILE: "raise the open-file limit (e.g. ulimit -n 65536)"}


def os_error_message(err: OSError, *, command: str) -> str:
    """One line for an OS error: what failed, where, and whether ``--resume`` continues the run."""
    where = err.filename if err.filename is not None else "?"
    what = err.strerror or str(err)
    code = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    fix = _FIXES.get(err.errno, "fix the cause")
    again = ("then rerun the same command with --resume: the finished part is kept"
             if command in _RESUMABLE else "then rerun the command")
    return f"{what}{f' [{code}]' if code else ''}: {where}; {fix}, {again}"


if __name__ == "__main__":
    sys.exit(main())
