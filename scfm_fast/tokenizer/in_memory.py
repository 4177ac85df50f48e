"""Tokenize an in-memory AnnData (the same semantics and backends as a corpus run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from .._errors import InputFileError
from ..store.schema import with_table_config
from ._inputs import ENSEMBL_ID_COLUMN, FILTER_COLUMN
from .pipeline import COUNTS_COLUMN, TOTAL_COLUMN, tokenize_chunk
from .qc import check_qc_mode
from .spec import TokenizerSpec, _check_options, spec_options


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
    gene_mapping_file: str | Path | None = None,
    keep_counts: bool = False,
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
    gene_mapping_file, keep_counts
        Geneformer's gene mapping and ``keep_counts``, as in :func:`tokenize_corpus`.
    species, species_column, normalize_total, qc
        GeneCompass options, as in :func:`tokenize_corpus` (``qc`` over all cells of ``adata``).

    Returns
    -------
    pyarrow.Table
        ``input_ids`` (list<int32>), ``length``, ``cell_index`` (row in ``adata``), then ``values`` and
        ``species`` (GeneCompass) and ``counts`` (``keep_counts``) when asked for; cells without any
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
    spec_kw = spec_options(locals())  # first: only the parameters are local yet
    import scipy.sparse as sp

    from ..readers.base import CellChunk
    from ..readers.obs import ObsBlock

    _check_options(max_len=None, n_special=0, n_threads=None, chunk_size=chunk_size)
    check_qc_mode(qc)
    spec = TokenizerSpec.build(**spec_kw)
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
    if gene_id_column is None and ENSEMBL_ID_COLUMN in var.columns:
        gene_id_column = ENSEMBL_ID_COLUMN  # Geneformer's convention, as in tokenize_corpus
    gene_ids = (var[gene_id_column] if gene_id_column else var.index).astype(str).to_numpy()
    col_token, _ = spec.resolve(gene_ids, source="adata")
    obs_cols = [c for c in dict.fromkeys((TOTAL_COLUMN, FILTER_COLUMN, species_column)) if c in adata.obs.columns]
    qc_keep = None
    if qc is not None:
        from .qc import matrix_qc

        qc_keep, _ = matrix_qc(X, gene_ids, chunk_size=chunk_size)
    out_cols = ["input_ids", "length", "cell_index", *(["values", "species"] if spec.values else []),
                *([COUNTS_COLUMN] if keep_counts else [])]
    tables = []
    for start in range(0, adata.n_obs, chunk_size):
        stop = min(start + chunk_size, adata.n_obs)
        block = X[start:stop]
        block = sp.csr_matrix(block) if not sp.issparse(block) else block.tocsr()
        chunk = CellChunk(start, block.indptr.astype(np.int64), block.indices.astype(np.int32),
                          block.data, ObsBlock.from_pandas(adata.obs.iloc[start:stop][obs_cols]))
        tab, _ = tokenize_chunk(spec, chunk, col_token, path="adata", var_names=gene_ids,
                                qc_keep=None if qc_keep is None else qc_keep[start:stop])
        tables.append(tab.select(out_cols))
    out = pa.concat_tables(tables) if tables else pa.table(
        {"input_ids": pa.array([], pa.list_(pa.int32())), "length": pa.array([], pa.int32()),
         "cell_index": pa.array([], pa.int64())})
    # embed / perturb read the special tokens, dictionary and orthologs from here, as from a manifest
    return with_table_config(out, spec.config)
