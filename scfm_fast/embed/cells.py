"""Cell (and gene) embeddings from a Geneformer-style encoder, on the unpadded fast path.

Cells are sorted by length and packed into token-budget batches; each batch runs
:meth:`~scfm_fast.model.bert.BertEncoderModel.forward_varlen` up to the requested layer only, then
pools per cell with pads and special tokens excluded. Results come back in the input order and do
not depend on the batch size or the order of cells (attention never crosses cells).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._dtypes import resolve_dtype
from .._errors import InputFileError, UsageError
from .._progress import progress

DEFAULT_SPECIAL_IDS = (0, 1)  # <pad>, <mask> in Geneformer's dictionaries


@dataclass
class TokenSource:
    """Random access to cells' token arrays plus their labels."""

    get: Any
    lengths: np.ndarray
    cell_index: np.ndarray
    special_ids: tuple[int, ...] | None = None
    name: str = "tokens"

    def __len__(self) -> int:
        return int(self.lengths.size)


def as_token_source(tokens: Any) -> TokenSource:
    """A token dataset directory, a pyarrow Table with ``input_ids``, or a list of int arrays."""
    if isinstance(tokens, TokenSource):
        return tokens
    if isinstance(tokens, (str, Path)):
        from ..store import TokenStore

        store = TokenStore(tokens)
        spec = store.manifest.get("config", {}).get("special_tokens")
        specials = tuple(int(v) for v in spec.values()) if spec else None
        return TokenSource(store.__getitem__, np.asarray(store.lengths), np.asarray(store.cell_index), specials,
                           str(tokens))
    try:
        import pyarrow as pa

        if isinstance(tokens, pa.Table):
            ids = tokens.column("input_ids").combine_chunks()
            offs = ids.offsets.to_numpy()
            vals = ids.values.to_numpy(zero_copy_only=False)
            cidx = (tokens.column("cell_index").to_numpy() if "cell_index" in tokens.column_names
                    else np.arange(len(ids)))
            from ..store.schema import table_config

            spec = table_config(tokens).get("special_tokens")  # recorded by tokenize_anndata
            specials = tuple(int(v) for v in spec.values()) if spec else None
            return TokenSource(lambda i: vals[offs[i]:offs[i + 1]], np.diff(offs), cidx, specials, "the token table")
    except ImportError:  # pragma: no cover
        pass
    cells = [np.asarray(c, dtype=np.int64) for c in tokens]
    return TokenSource(cells.__getitem__, np.array([c.size for c in cells], dtype=np.int64), np.arange(len(cells)))


def check_inputs(src: TokenSource, model: Any, *, layer: int, pooling: str,
                 special_token_ids: Sequence[int] | None = None) -> None:
    """Fail before any work when ``model`` cannot embed ``src`` as asked.

    Checks the pooling name, that ``layer`` exists, that every cell fits the model's positions and,
    for ``pooling="cls"``, that the first cell starts with a special token (V1 tokens have no
    ``<cls>``; :func:`iter_embeddings` checks every cell as it goes).

    Raises
    ------
    UsageError
        Bad ``pooling`` or ``layer``, or ``"cls"`` pooling of tokens without ``<cls>``.
    InputFileError
        A cell longer than the model's ``max_position_embeddings``.
    """
    if pooling not in ("mean", "cls"):
        msg = f"pooling={pooling!r}; use 'mean' or 'cls'"
        raise UsageError(msg)
    try:
        model.resolve_layer(layer)
    except ValueError as e:
        msg = f"{e}; pick another --layer"
        raise UsageError(msg) from None
    n_pos = model.config.max_position_embeddings
    long = np.flatnonzero(src.lengths > n_pos)
    if long.size:
        msg = (f"{src.name}: cell {src.cell_index[long[0]]} has {src.lengths[long[0]]} tokens ({long.size} cells "
               f"longer than {n_pos}) but the model has {n_pos} positions; tokenize with --max-len {n_pos}")
        raise InputFileError(msg)
    specials = _known_specials(src, special_token_ids)
    first = np.flatnonzero(src.lengths > 0)[:1]
    if pooling == "cls" and specials is not None and first.size:
        _check_cls(src, first, np.asarray(src.get(int(first[0])))[:1], specials)


def _known_specials(src: TokenSource, special_token_ids: Sequence[int] | None) -> tuple[int, ...] | None:
    """Special token ids when given or recorded in the token dataset, else ``None`` (unknown)."""
    known = special_token_ids if special_token_ids is not None else src.special_ids
    return None if known is None else tuple(sorted({int(t) for t in known}))


def _check_cls(src: TokenSource, pos: np.ndarray, first_tokens: np.ndarray, specials: tuple[int, ...]) -> None:
    bad = np.flatnonzero(~np.isin(first_tokens, specials))
    if bad.size:  # a gene in first place: "cls" pooling would silently return that gene's embedding
        msg = (f"{src.name}: pooling 'cls' reads each cell's first token, but cell {src.cell_index[pos[bad[0]]]} "
               f"starts with gene token {first_tokens[bad[0]]}: these tokens have no <cls> (Geneformer V1); "
               "use --pool mean (pooling='mean'), or tokens made with <cls> (--preset geneformer-v2)")
        raise UsageError(msg)


def _check_vocab(src: TokenSource, pos: np.ndarray, ids: np.ndarray, cu: np.ndarray, vocab: int) -> None:
    bad = np.flatnonzero((ids < 0) | (ids >= vocab))
    if bad.size:  # else an opaque IndexError (CPU) or a device-side assert (CUDA) in the embedding gather
        row = int(bad[0])
        cell = pos[np.searchsorted(cu, row, side="right") - 1]
        msg = (f"{src.name}: cell {src.cell_index[cell]} has token id {int(ids[row])}, outside the model's "
               f"vocabulary of {vocab} tokens; tokenize with this model's token dictionary")
        raise InputFileError(msg)


def iter_embeddings(
    tokens: Any,
    model: Any,
    *,
    layer: int = -1,
    pooling: str = "mean",
    genes: bool = False,
    batch_tokens: int | None = None,
    device: str | torch.device | None = None,
    dtype: Any = None,
    special_token_ids: Sequence[int] | None = None,
    progress_bar: bool | None = True,
) -> Iterator[tuple[np.ndarray, np.ndarray, dict | None]]:
    """Yield ``(positions, cell_embeddings, gene_sums)`` batch by batch (see :func:`embed_tokens`)."""
    from ..kernels.pooling import first_token, segment_mean
    from ..loader import pack_cells, token_budget_batches

    src = tokens if isinstance(tokens, TokenSource) else as_token_source(tokens)
    check_inputs(src, model, layer=layer, pooling=pooling, special_token_ids=special_token_ids)
    known = _known_specials(src, special_token_ids)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev).eval()
    lowp = resolve_dtype(dtype)
    specials = torch.tensor(DEFAULT_SPECIAL_IDS if known is None else known, dtype=torch.int64, device=dev)
    budget = batch_tokens or (65_536 if dev.type == "cuda" else 8_192)
    nonempty = np.flatnonzero(src.lengths > 0)
    batches = token_budget_batches(src.lengths[nonempty], max_tokens=budget)
    with progress(total=int(nonempty.size), desc="embed", enabled=progress_bar) as bar, torch.inference_mode():
        for b in batches:
            pos = nonempty[b]
            batch = pack_cells([src.get(int(i)) for i in pos], index=pos)
            host_ids, cu = batch.input_ids.numpy(), batch.cu_seqlens.numpy()
            _check_vocab(src, pos, host_ids, cu, model.config.vocab_size)
            if pooling == "cls" and known is not None:
                _check_cls(src, pos, host_ids[cu[:-1]], known)
            batch = batch.to(dev)
            with torch.autocast(dev.type, dtype=lowp, enabled=lowp is not None and lowp != torch.float32):
                h = model.forward_varlen(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, layer=layer,
                                         position_ids=batch.position_ids)
            keep = ~torch.isin(batch.input_ids, specials)
            emb = first_token(h, batch.cu_seqlens) if pooling == "cls" else segment_mean(h, batch.cu_seqlens, keep)
            gene = None
            if genes:
                ids = batch.input_ids[keep]
                gene = {"ids": ids.cpu().numpy(), "h": h[keep].float().cpu().numpy()}
            yield pos, emb.float().cpu().numpy(), gene
            bar.update(len(pos))


def embed_tokens(
    tokens: Any,
    model: Any,
    *,
    layer: int = -1,
    pooling: str = "mean",
    genes: bool = False,
    batch_tokens: int | None = None,
    device: str | torch.device | None = None,
    dtype: Any = None,
    special_token_ids: Sequence[int] | None = None,
    progress_bar: bool | None = True,
) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """Embed every cell of a token source.

    Parameters
    ----------
    tokens
        Token dataset directory (``scfm tokenize`` output), pyarrow Table with ``input_ids``, or a
        list of token arrays.
    model
        :class:`~scfm_fast.model.bert.BertEncoderModel` (see :func:`~scfm_fast.model.checkpoint.load_encoder`).
    layer
        Hidden layer to read (``-1`` last, ``-2`` second to last as Geneformer's default for
        perturbation, ``0`` embeddings); later layers are not computed.
    pooling
        ``"mean"`` over the cell's genes (pads and special tokens excluded) or ``"cls"`` (first token, V2).
    genes
        Also return per-gene embeddings: the mean of each gene's contextual embedding over the cells
        where it occurs.
    batch_tokens
        Token budget per batch (default 8,192 on CPU, 65,536 on CUDA).
    device
        Device to run on (default: the model's).
    dtype
        ``None``/``"float32"`` or ``"bfloat16"``/``"float16"`` autocast.
    special_token_ids
        Token ids excluded from mean pooling (default: from the token dataset's manifest, else
        ``<pad>``/``<mask>`` = 0/1).
    progress_bar
        Show a progress bar.

    Returns
    -------
    cell_embeddings
        ``float32 (n_cells, hidden)`` in input order; NaN rows for cells without tokens.
    gene_embeddings
        ``None``, or ``{"token": int64 (g,), "n": int64 (g,), "embedding": float32 (g, hidden)}``.

    Raises
    ------
    UsageError
        A ``layer`` the model lacks, or ``"cls"`` pooling of cells that do not start with a special token.
    InputFileError
        A cell longer than the model's positions or with a token id outside its vocabulary (names the cell).
    """
    src = as_token_source(tokens)
    hidden = model.config.hidden_size
    out = np.full((len(src), hidden), np.nan, dtype=np.float32)
    sums = counts = None
    if genes:
        sums = np.zeros((model.config.vocab_size, hidden), dtype=np.float64)
        counts = np.zeros(model.config.vocab_size, dtype=np.int64)
    for pos, emb, gene in iter_embeddings(src, model, layer=layer, pooling=pooling, genes=genes,
                                          batch_tokens=batch_tokens, device=device, dtype=dtype,
                                          special_token_ids=special_token_ids, progress_bar=progress_bar):
        out[pos] = emb
        if gene is not None:
            np.add.at(sums, gene["ids"], gene["h"])
            np.add.at(counts, gene["ids"], 1)
    gene_out = None
    if genes:
        seen = np.flatnonzero(counts)
        gene_out = {"token": seen, "n": counts[seen],
                    "embedding": (sums[seen] / counts[seen, None]).astype(np.float32)}
    return out, gene_out


def embed_cells(
    adata: Any,
    model: Any,
    *,
    layer: int = -1,
    pooling: str = "mean",
    key_added: str = "X_geneformer",
    genes: bool = False,
    batch_tokens: int | None = None,
    device: str | torch.device | None = None,
    dtype: Any = None,
    copy: bool = False,
    tokenize_kwargs: dict | None = None,
) -> Any:
    """Tokenize an AnnData and write cell embeddings to ``adata.obsm[key_added]``.

    Parameters
    ----------
    adata
        Cells x genes with raw counts (see :func:`~scfm_fast.tokenizer.pipeline.tokenize_anndata`).
    model
        :class:`~scfm_fast.model.bert.BertEncoderModel`.
    layer, pooling, batch_tokens, device, dtype
        As in :func:`embed_tokens`.
    key_added
        ``obsm`` key for cell embeddings; with ``genes=True`` gene embeddings go to
        ``adata.varm[key_added]`` (NaN for genes outside the vocabulary or never expressed).
    genes
        Also compute gene embeddings.
    copy
        Work on a copy and return it (else modify ``adata`` and return ``None``).
    tokenize_kwargs
        Options for :func:`~scfm_fast.tokenizer.pipeline.tokenize_anndata` (preset, layer, ...).

    Returns
    -------
    ``AnnData`` when ``copy``, else ``None``. Cells with no expressed vocabulary gene get NaN rows.
    """
    from ..tokenizer.pipeline import TokenizerSpec, tokenize_anndata
    from ..vocab import resolve_genes

    adata = adata.copy() if copy else adata
    kw = dict(tokenize_kwargs or {})
    table = tokenize_anndata(adata, **kw)
    preset = kw.get("preset", "geneformer-v1")
    spec = TokenizerSpec.build(**{k: v for k, v in kw.items() if k in (
        "preset", "token_dictionary", "gene_median", "gene_name_map", "orthologs", "min_gene_match")})
    specials = [t for name in ("<pad>", "<mask>", "<cls>", "<eos>")
                if (t := spec.vocab.token_of.get(name)) is not None]
    emb, gene = embed_tokens(table, model, layer=layer, pooling=pooling, genes=genes, batch_tokens=batch_tokens,
                             device=device, dtype=dtype, special_token_ids=specials, progress_bar=None)
    full = np.full((adata.n_obs, emb.shape[1]), np.nan, dtype=np.float32)
    full[table.column("cell_index").to_numpy()] = emb
    adata.obsm[key_added] = full
    if genes:
        gid_col = kw.get("gene_id_column")
        var = adata.raw.var if kw.get("use_raw") else adata.var
        gene_ids = (var[gid_col] if gid_col else var.index).astype(str).to_numpy()
        col, _ = resolve_genes(gene_ids, spec.vocab, gene_name_map=spec.gene_name_map,
                               ortholog_map=spec.ortholog_map, min_fraction=0.0)
        lookup = np.full((spec.vocab.size, emb.shape[1]), np.nan, dtype=np.float32)
        lookup[gene["token"]] = gene["embedding"]
        varm = np.full((len(gene_ids), emb.shape[1]), np.nan, dtype=np.float32)
        varm[col >= 0] = lookup[col[col >= 0]]
        adata.varm[key_added] = varm
    adata.uns[key_added] = {"layer": layer, "pooling": pooling, "preset": preset}
    return adata if copy else None
