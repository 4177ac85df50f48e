"""Cell (and gene) embeddings from a Geneformer-style or GeneCompass encoder, on the unpadded fast path.

``embed_tokens`` takes a token source; ``embed_cells`` tokenizes an AnnData first (GeneCompass models
with ``preset="genecompass"``: values and species come with the tokens).

Cells are sorted by length and packed into token-budget batches; each batch runs
:meth:`~scfm_fast.model.bert.BertEncoderModel.forward_varlen` (GeneCompass: its own ``forward_varlen``
with values and species, see :mod:`.genecompass`) up to the requested layer only, then
pools per cell with pads and special tokens excluded. Results come back in the input order and do
not depend on the batch size or the order of cells (attention never crosses cells).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .._dtypes import resolve_dtype
from .._errors import InputFileError, UsageError
from .._progress import progress
from ..store.cells import CellSource, open_cells
from .genecompass import batch_lengths, check_family, embed_batch, is_genecompass

DEFAULT_SPECIAL_IDS = (0, 1)  # <pad>, <mask> in Geneformer's dictionaries


def check_inputs(src: CellSource, model: Any, *, layer: int, pooling: str,
                 special_token_ids: Sequence[int] | None = None, no_attention_mask: bool = False,
                 pad_to: int | None = None) -> None:
    """Fail before any work when ``model`` cannot embed ``src`` as asked.

    Checks the pooling name, that ``layer`` exists, that every cell fits the model's positions, that
    every token id is inside the model's vocabulary and, for ``pooling="cls"``, that the first cell
    starts with a special token (V1 tokens have no ``<cls>``; :func:`iter_embeddings` checks every
    cell as it goes). GeneCompass models and tokens are checked by :func:`.genecompass.check_family`
    (each family refuses the other's tokens).

    Raises
    ------
    UsageError
        Bad ``pooling`` or ``layer``, ``"cls"`` pooling of tokens without ``<cls>``, or tokens of the
        other model family.
    InputFileError
        A cell longer than the model's ``max_position_embeddings`` or with a token id outside its
        vocabulary (names the cell).
    """
    if pooling not in ("mean", "cls"):
        msg = f"pooling={pooling!r}; use 'mean' or 'cls'"
        raise UsageError(msg)
    try:
        (model.bert if is_genecompass(model) else model).resolve_layer(layer)
    except ValueError as e:
        msg = f"{e}; pick another --layer"
        raise UsageError(msg) from None
    check_family(src, model, pooling=pooling, no_attention_mask=no_attention_mask, pad_to=pad_to)
    n_pos = model.config.max_position_embeddings
    long = np.flatnonzero(src.lengths > n_pos)
    if long.size:
        msg = (f"{src.name}: cell {src.cell_index[long[0]]} has {src.lengths[long[0]]} tokens ({long.size} cells "
               f"longer than {n_pos}) but the model has {n_pos} positions; tokenize with --max-len {n_pos}")
        raise InputFileError(msg)
    bad = src.first_token_outside(model.config.vocab_size)
    if bad is not None:
        _vocab_error(src, bad[0], bad[1], model.config.vocab_size)
    specials = _known_specials(src, special_token_ids)
    first = np.flatnonzero(src.lengths > 0)[:1]
    if pooling == "cls" and specials is not None and first.size and not is_genecompass(model):
        _check_cls(src, first, src.take(first)[0][:1], specials)


def _known_specials(src: CellSource, special_token_ids: Sequence[int] | None) -> tuple[int, ...] | None:
    """Special token ids when given or recorded in the token dataset, else ``None`` (unknown)."""
    known = special_token_ids if special_token_ids is not None else src.special_token_ids
    return None if known is None else tuple(sorted({int(t) for t in known}))


def _check_cls(src: CellSource, pos: np.ndarray, first_tokens: np.ndarray, specials: tuple[int, ...]) -> None:
    bad = np.flatnonzero(~np.isin(first_tokens, specials))
    if bad.size:  # a gene in first place: "cls" pooling would silently return that gene's embedding
        msg = (f"{src.name}: pooling 'cls' reads each cell's first token, but cell {src.cell_index[pos[bad[0]]]} "
               f"starts with gene token {first_tokens[bad[0]]}: these tokens have no <cls> (Geneformer V1); "
               "use --pool mean (pooling='mean'), or tokens made with <cls> (--preset geneformer-v2)")
        raise UsageError(msg)


def _vocab_error(src: CellSource, pos: int, token: int, vocab: int) -> None:
    # else an opaque IndexError (CPU) or a device-side assert (CUDA) in the embedding gather
    msg = (f"{src.name}: cell {src.cell_index[pos]} has token id {token}, outside the model's vocabulary of "
           f"{vocab} tokens; tokenize with this model's token dictionary")
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
    no_attention_mask: bool = False,
    pad_to: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, dict | None]]:
    """Yield ``(positions, cell_embeddings, gene_sums)`` batch by batch (see :func:`embed_tokens`)."""
    from ..kernels.pooling import first_token, segment_mean
    from ..loader import pack_cells, token_budget_batches

    src = open_cells(tokens)
    check_inputs(src, model, layer=layer, pooling=pooling, special_token_ids=special_token_ids,
                 no_attention_mask=no_attention_mask, pad_to=pad_to)
    gc = is_genecompass(model)
    known = _known_specials(src, special_token_ids)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev).eval()
    lowp = resolve_dtype(dtype)
    specials = torch.tensor(DEFAULT_SPECIAL_IDS if known is None else known, dtype=torch.int64, device=dev)
    budget = batch_tokens or (65_536 if dev.type == "cuda" else 8_192)
    nonempty = np.flatnonzero(src.lengths > 0)
    cost = batch_lengths(src, model, no_attention_mask=no_attention_mask, pad_to=pad_to) if gc else src.lengths
    batches = token_budget_batches(cost[nonempty], max_tokens=budget)
    with progress(total=int(nonempty.size), desc="embed", enabled=progress_bar) as bar, torch.inference_mode():
        for b in batches:
            pos = nonempty[b]
            if gc:
                emb_np, gene = embed_batch(model, src, pos, layer=layer, pooling=pooling, genes=genes, device=dev,
                                           lowp=lowp, no_attention_mask=no_attention_mask, pad_to=pad_to)
                yield pos, emb_np, gene
                bar.update(len(pos))
                continue
            batch = pack_cells(src.take(pos), index=pos)
            host_ids, cu = batch.input_ids.numpy(), batch.cu_seqlens.numpy()
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
    no_attention_mask: bool = False,
    pad_to: int | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """Embed every cell of a token source.

    Parameters
    ----------
    tokens
        Token dataset directory (``scfm tokenize`` output; refused when unfinished or empty), Parquet
        file or pyarrow Table with ``input_ids`` (GeneCompass: and ``values``, ``species``), list of token
        arrays, or a :class:`~scfm_fast.store.cells.CellSource` (any view of one).
    model
        :class:`~scfm_fast.model.bert.BertEncoderModel` or
        :class:`~scfm_fast.model.genecompass.GeneCompassModel` (see
        :func:`~scfm_fast.model.checkpoint.load_encoder`); each refuses the other family's tokens.
    layer
        Hidden layer to read (``-1`` last, ``-2`` second to last as Geneformer's default for
        perturbation, ``0`` embeddings); later layers are not computed.
    pooling
        ``"mean"`` over the cell's genes (pads and special tokens excluded) or ``"cls"`` (first token, V2;
        GeneCompass: the species row).
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
    no_attention_mask
        GeneCompass only: pad each cell with ``(0, 0.0)`` genes to ``pad_to`` and let the pads attend, as
        GeneCompass's own embedding scripts do (they pass no mask); reproduces their numbers, which
        depend on the padded length. Off by default.
    pad_to
        Padded length for ``no_attention_mask`` (default: the model's positions, 2,048 for the released
        checkpoints, the length GeneCompass's datasets are padded to).

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
    src = open_cells(tokens)
    hidden = model.config.hidden_size
    out = np.full((len(src), hidden), np.nan, dtype=np.float32)
    sums = counts = None
    if genes:
        sums = np.zeros((model.config.vocab_size, hidden), dtype=np.float64)
        counts = np.zeros(model.config.vocab_size, dtype=np.int64)
    for pos, emb, gene in iter_embeddings(src, model, layer=layer, pooling=pooling, genes=genes,
                                          batch_tokens=batch_tokens, device=device, dtype=dtype,
                                          special_token_ids=special_token_ids, progress_bar=progress_bar,
                                          no_attention_mask=no_attention_mask, pad_to=pad_to):
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
    key_added: str | None = None,
    genes: bool = False,
    batch_tokens: int | None = None,
    device: str | torch.device | None = None,
    dtype: Any = None,
    copy: bool = False,
    tokenize_kwargs: dict | None = None,
    no_attention_mask: bool = False,
    pad_to: int | None = None,
) -> Any:
    """Tokenize an AnnData and write cell embeddings to ``adata.obsm[key_added]``.

    Parameters
    ----------
    adata
        Cells x genes with raw counts (see :func:`~scfm_fast.tokenizer.pipeline.tokenize_anndata`).
    model
        :class:`~scfm_fast.model.bert.BertEncoderModel` or
        :class:`~scfm_fast.model.genecompass.GeneCompassModel`. A GeneCompass model tokenizes with
        ``preset="genecompass"`` unless ``tokenize_kwargs`` names a preset; give its ``token_dictionary``
        and ``gene_median`` there, and exactly one of ``species`` (``"human"``/``"mouse"``) or
        ``species_column``. The values and species travel with the tokens to the model, as in ``scfm embed``.
    layer, pooling, batch_tokens, device, dtype, no_attention_mask, pad_to
        As in :func:`embed_tokens`.
    key_added
        ``obsm`` key for cell embeddings (default ``"X_geneformer"``, ``"X_genecompass"`` for a GeneCompass
        model); with ``genes=True`` gene embeddings go to ``adata.varm[key_added]`` (NaN for genes
        outside the vocabulary or never expressed).
    genes
        Also compute gene embeddings.
    copy
        Work on a copy and return it (else modify ``adata`` and return ``None``).
    tokenize_kwargs
        Options for :func:`~scfm_fast.tokenizer.pipeline.tokenize_anndata` (preset, layer, ...).

    Returns
    -------
    ``AnnData`` when ``copy``, else ``None``. Cells with no expressed vocabulary gene get NaN rows.

    Raises
    ------
    InputFileError
        A GeneCompass model with a token dictionary of another size than its vocabulary.
    """
    from ..tokenizer.pipeline import TokenizerSpec, tokenize_anndata
    from ..vocab import resolve_genes

    gc = is_genecompass(model)
    key_added = key_added or ("X_genecompass" if gc else "X_geneformer")
    kw = dict(tokenize_kwargs or {})
    preset = kw.setdefault("preset", "genecompass" if gc else "geneformer-v1")
    spec = TokenizerSpec.build(**{k: v for k, v in kw.items() if k in (
        "preset", "token_dictionary", "gene_median", "gene_name_map", "orthologs", "min_gene_match", "species",
        "species_column", "normalize_total")})
    if gc and spec.values:  # another dictionary version: every id would name another gene, silently
        from ..model.genecompass_checkpoint import check_token_dictionary

        check_token_dictionary(model, spec.vocab.token_of)
    adata = adata.copy() if copy else adata
    table = tokenize_anndata(adata, **kw)
    specials = [t for name in ("<pad>", "<mask>", "<cls>", "<eos>")
                if (t := spec.vocab.token_of.get(name)) is not None]
    emb, gene = embed_tokens(table, model, layer=layer, pooling=pooling, genes=genes, batch_tokens=batch_tokens,
                             device=device, dtype=dtype, special_token_ids=specials, progress_bar=None,
                             no_attention_mask=no_attention_mask, pad_to=pad_to)
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
    adata.uns[key_added] = {"layer": layer, "pooling": pooling, "preset": preset,
                            **({"no_attention_mask": no_attention_mask} if gc else {})}
    return adata if copy else None
