"""Public entry points: :func:`perturb_cells`, :func:`perturb_cells_reference` and :func:`measure_approx_error`
(all run :func:`~scfm_fast.perturb.screen.run_engine`)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
import torch

from .screen import CELL_READOUTS, MODES, STATE_SHIFTS, layer_of, run_engine

__all__ = ["CELL_READOUTS", "MODES", "STATE_SHIFTS", "layer_of", "measure_approx_error", "perturb_cells",
           "perturb_cells_reference"]


def _engine_options(options: Mapping[str, Any], *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """A front end's options (its ``locals()``) as :func:`run_engine` keywords, so that the forwarded list
    is written once, in ``run_engine``'s signature. Every option but ``exclude`` must be one of them."""
    names, skip = inspect.signature(run_engine).parameters, set(exclude)
    unknown = [k for k in options if k not in names and k not in skip]
    if unknown:
        msg = f"run_engine takes no options {unknown}"
        raise TypeError(msg)
    return {k: v for k, v in options.items() if k not in skip}


def perturb_cells(
    tokens: Any,
    model: Any,
    *,
    perturbation: str = "delete",
    genes: Any = "all",
    anchor: int | str | None = None,
    combine: bool = False,
    rank_shift: float = 0.25,
    rank_shift_quartiles: int | None = None,
    layer: int | None = None,
    emb_layer: int | None = None,
    pooling: str | None = None,
    cell_readout: str = "genes",
    mode: str = "exact",
    batch_tokens: int | None = None,
    device: str | torch.device | None = None,
    dtype: Any = None,
    special_token_ids: Iterable[int] | None = None,
    token_dictionary: Any = None,
    gene_name_map: Any = None,
    orthologs: Any = None,
    gene_shifts: bool = False,
    target_embedding: Any = None,
    target_names: Iterable[str] | None = None,
    state_shift: str = "all",
    skip_absent: bool = False,
    approx_check_cells: int = 1,
    progress_bar: bool = True,
    no_attention_mask: bool = False,
    pad_to: int | None = None,
) -> pd.DataFrame:
    """In-silico perturbation of cells with a Geneformer-family or GeneCompass encoder (batched, exact by default).

    Parameters
    ----------
    tokens
        A token dataset directory (Parquet shards with ``input_ids`` and optionally ``cell_index``), a
        ``pyarrow.Table`` with those columns, or a list of token-id arrays (one per cell).
    model
        A :class:`~scfm_fast.model.bert.BertEncoderModel` or a
        :class:`~scfm_fast.model.genecompass.GeneCompassModel` with GeneCompass tokens (values and species;
        moved to ``device`` and set to eval mode).
    perturbation
        ``"delete"``, ``"overexpress"``, ``"inhibit"`` or ``"activate"`` (semantics in
        :mod:`scfm_fast.perturb.plan`; GeneCompass: delete and overexpress, see
        :mod:`scfm_fast.perturb.genecompass`).
    genes
        ``"all"`` (every gene of each cell, one at a time), one gene, or a list; an item that is a
        tuple/list is a group perturbed together (e.g. pairs). Genes are token ids, Ensembl IDs or symbols.
        Genes absent from a cell are skipped and listed in ``df.attrs["skipped"]``.
    anchor
        Perturb this gene together with each target (Geneformer's ``combos=1`` + ``anchor_gene``).
    combine
        Perturb the whole ``genes`` list together, as one variant per cell.
    rank_shift
        Bin width (fraction of the cell's length) for ``activate`` / ``inhibit`` (0.25 = quartiles); the
        gene moves one bin.
    rank_shift_quartiles
        Geneformer's ``perturb_rank_shift``: move ``activate`` / ``inhibit`` genes by 1, 2 or 3 quartiles
        (overrides ``rank_shift``).
    layer
        Readout layer: ``-1`` last, ``-2`` second-to-last, ``0`` embedding output, ``k`` the output of
        encoder layer ``k``. Default (``None``): the model family's own, ``-2`` for Geneformer models (its
        ``emb_layer=-1``) and ``-1`` for GeneCompass (its ``perturb_delete_chipseq.py`` reads the last
        layer); give ``layer=`` to read another (``df.attrs["layer"]`` records the one read).
    emb_layer
        Geneformer's numbering instead of ``layer`` (not both): ``0`` = last layer (``layer=-1``), ``-1`` =
        second-to-last (``layer=-2``).
    pooling
        ``"mean"`` over genes (special tokens excluded) or ``"cls"`` (the ``<cls>`` row); default ``"cls"``
        for a token dataset whose config records a ``<cls>`` token (V2), else ``"mean"``.
    cell_readout
        With mean pooling, what ``cos_sim`` is: ``"genes"`` (default, Geneformer's) = the mean of each
        aligned gene's own cosine (perturbed vs original row; perturbed genes excluded), ``"pooled"`` =
        the cosine of the two mean-pooled embeddings of the aligned genes.
    mode
        ``"exact"`` (equals the reference within fp32 tolerance) or ``"approx"`` (KV-cache reuse,
        cheaper, approximate; see :mod:`scfm_fast.perturb.approx`; its measured error is reported in
        ``df.attrs["approx_error"]``).
    batch_tokens
        Tokens per batched forward (default 131,072 on CUDA, 4,096 on CPU).
    device
        Compute device (default: the model's).
    dtype
        ``None``/``"float32"``, or ``"bfloat16"`` / ``"float16"`` autocast.
    special_token_ids
        Token ids never perturbed nor pooled (default: those a token dataset directory's manifest
        records, else ``<pad>``, ``<mask>``, ``<cls>``, ``<eos>`` of the token dictionary).
    token_dictionary
        Ensembl ID -> token id (dict or pickle path); default: bundled Geneformer V1 dictionary.
    gene_name_map
        Symbol -> Ensembl ID (dict or pickle path); default: the table the token dataset was tokenized
        with (on a joint human + mouse GeneCompass dataset, symbols resolve in each cell's own species).
    orthologs
        ``"mouse-to-human"`` or an ortholog table path, for cells tokenized with ``orthologs=``: mouse
        targets (``"Actb"``, ``ENSMUSG…``) resolve through it, as the tokenizer resolved them (default: the
        token dataset directory's own setting, from its manifest).
    gene_shifts
        Also report each remaining gene's cosine similarity (``gene_shift_tokens`` / ``gene_shift_cos``).
    target_embedding
        A target cell-state embedding ``(H,)`` (e.g. the mean embedding of healthy cells): adds
        ``target_shift``; or ``(S, H)`` with ``target_names`` (one column per state).
    target_names
        Column names of the ``S`` state shifts (default ``["target_shift"]``).
    state_shift
        Cell embedding compared with the states under mean pooling: ``"all"`` (default, Geneformer today)
        = the mean over all of each cell's genes, ``"aligned"`` (Geneformer's 2023 code) = the mean over
        the genes present in both cells.
    skip_absent
        ``overexpress``: skip genes a cell lacks instead of inserting them at the front (Geneformer's;
        the cell is cut to the model's input size from its end, keeping ``<eos>``).
    approx_check_cells
        With ``mode="approx"``: rerun this many cells exactly to measure the approximation error.
    progress_bar
        Show a progress bar.
    no_attention_mask, pad_to
        GeneCompass only, to reproduce its own scripts (off by default): every variant and the original are
        padded with ``(0, 0.0)`` genes to ``pad_to`` (default: the model's positions) and the pads attend.

    Returns
    -------
    pandas.DataFrame
        One row per (cell, variant); columns documented in :mod:`scfm_fast.perturb._results`.
    """
    return run_engine(engine=mode, **_engine_options(locals(), exclude=("mode",)))


def perturb_cells_reference(
    tokens: Any,
    model: Any,
    *,
    perturbation: str = "delete",
    genes: Any = "all",
    anchor: int | str | None = None,
    combine: bool = False,
    rank_shift: float = 0.25,
    rank_shift_quartiles: int | None = None,
    layer: int | None = None,
    emb_layer: int | None = None,
    pooling: str | None = None,
    cell_readout: str = "genes",
    device: str | torch.device | None = None,
    special_token_ids: Iterable[int] | None = None,
    token_dictionary: Any = None,
    gene_name_map: Any = None,
    orthologs: Any = None,
    gene_shifts: bool = False,
    target_embedding: Any = None,
    target_names: Any = None,
    state_shift: str = "all",
    skip_absent: bool = False,
    forward_layer: int | None = None,
    progress_bar: bool = True,
    no_attention_mask: bool = False,
    pad_to: int | None = None,
) -> pd.DataFrame:
    """Reference in-silico perturbation: one plain fp32 forward pass per variant (batch of one).

    Parameters
    ----------
    tokens, model, perturbation, genes, anchor, combine, rank_shift, rank_shift_quartiles, layer, \
emb_layer, pooling, cell_readout, device, special_token_ids, token_dictionary, gene_name_map, orthologs, \
gene_shifts, target_embedding, target_names, state_shift, skip_absent, progress_bar, no_attention_mask, pad_to
        As for :func:`scfm_fast.perturb.perturb_cells`.
    forward_layer
        Run the model up to this layer and read out there instead of ``layer`` (benchmarks use ``-1`` to
        time Geneformer's whole-model forward).

    Returns
    -------
    pandas.DataFrame
        The same table as :func:`scfm_fast.perturb.perturb_cells` (``attrs["mode"] == "reference"``).
    """
    return run_engine(engine="reference", **_engine_options(locals()))


def measure_approx_error(tokens: Any, model: Any, **kwargs: Any) -> dict[str, float]:
    """Run the exact and approximate engines on the same cells and compare them.

    Parameters
    ----------
    tokens
        As for :func:`~scfm_fast.perturb.perturb_cells`.
    model
        A ``BertEncoderModel``.
    **kwargs
        Options of :func:`~scfm_fast.perturb.perturb_cells` (``mode`` is set by this function).

    Returns
    -------
    dict
        ``max_abs_dcos``, ``mean_abs_dcos`` (cosine similarity, approx vs exact), ``spearman_mean`` /
        ``spearman_min`` (per-cell Spearman correlation of the shift rankings), ``n_cells``, ``n_variants``.
    """
    from .approx import compare_results

    kwargs = {k: v for k, v in kwargs.items() if k not in ("mode", "approx_check_cells")}
    de = perturb_cells(tokens, model, mode="exact", **kwargs)
    da = perturb_cells(tokens, model, mode="approx", approx_check_cells=0, **kwargs)
    return compare_results(de["shift"].to_numpy(), da["shift"].to_numpy(), de["cell_index"].to_numpy())
