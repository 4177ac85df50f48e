"""GeneCompass's cell QC (``--qc genecompass``), computed within each input file.

A cell is dropped when, over the cells of its file,

* the z-score of its total count, or of its mitochondrial fraction, is ``>= 3`` in absolute value
  (population SD; GeneCompass keeps ``|z| < 3``; a metric with SD 0 drops nothing), or
* fewer than 7 protein-coding/miRNA genes have a nonzero count.

Gene biotypes and mitochondrial genes come from the bundled Ensembl tables (human GRCh38 e93, mouse
GRCm38 e100, :mod:`scfm_fast.vocab.ensembl`); source genes given as symbols are resolved through the
same tables.  The z-scores need the whole file, so :func:`file_qc` makes one streaming pass over it
before tokenization; memory is O(cells), not O(counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..vocab.ensembl import ensembl_name_map, qc_gene_sets
from ..vocab.gene_ids import strip_version

QC_MODES = ("genecompass",)
Z_MAX = 3.0
MIN_GENES = 7


@dataclass
class QcReport:
    """Cells of one file dropped by GeneCompass's QC (a cell may fail several rules)."""

    n_cells: int
    n_dropped: int
    n_dropped_total_count: int
    n_dropped_mito_fraction: int
    n_dropped_min_genes: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def qc_gene_flags(gene_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per source column: (is a protein-coding/miRNA gene, is a mitochondrial gene).

    Ensembl ids (versioned or not) are looked up directly, other identifiers as human or mouse
    symbols; unknown genes are neither.
    """
    counted, mito = qc_gene_sets("human", "mouse")
    names = ensembl_name_map("human", "mouse")
    ids = [strip_version(str(g).strip()) for g in gene_ids]
    ids = [g if g in counted or g in mito else names.get(g, g) for g in ids]
    return np.array([g in counted for g in ids], dtype=bool), np.array([g in mito for g in ids], dtype=bool)


def cell_qc_stats(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, *, counted: np.ndarray,
                  mito: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell of a CSR chunk: total count, mitochondrial fraction (0 for an empty cell) and the
    number of expressed protein-coding/miRNA genes."""
    indptr = np.asarray(indptr, dtype=np.int64)
    n_cells = indptr.shape[0] - 1
    vals = np.asarray(data[indptr[0]:indptr[-1]], dtype=np.float64)
    cols = np.asarray(indices[indptr[0]:indptr[-1]], dtype=np.int64)
    row = np.repeat(np.arange(n_cells), np.diff(indptr))
    total = np.bincount(row, weights=vals, minlength=n_cells)
    mito_sum = np.bincount(row, weights=vals * mito[cols], minlength=n_cells)
    n_genes = np.bincount(row, weights=(vals > 0) & counted[cols], minlength=n_cells).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(total > 0, mito_sum / total, 0.0)
    return total, fraction, n_genes


def _outliers(x: np.ndarray, z_max: float) -> np.ndarray:
    sd = x.std()
    if not sd > 0:
        return np.zeros(x.shape, dtype=bool)
    return np.abs((x - x.mean()) / sd) >= z_max


def genecompass_keep(total: np.ndarray, mito_fraction: np.ndarray, n_genes: np.ndarray, *,
                     z_max: float = Z_MAX, min_genes: int = MIN_GENES) -> tuple[np.ndarray, QcReport]:
    """Which cells of a file pass GeneCompass's QC, from :func:`cell_qc_stats` over the whole file.

    Returns
    -------
    keep
        bool per cell.
    report
        :class:`QcReport` with the counts of dropped cells (for the manifest).
    """
    bad_total = _outliers(np.asarray(total, dtype=np.float64), z_max)
    bad_mito = _outliers(np.asarray(mito_fraction, dtype=np.float64), z_max)
    few = np.asarray(n_genes) < min_genes
    keep = ~(bad_total | bad_mito | few)
    report = QcReport(int(keep.size), int((~keep).sum()), int(bad_total.sum()), int(bad_mito.sum()),
                      int(few.sum()))
    return keep, report


def file_qc(reader, *, chunk_size: int = 10_000) -> tuple[np.ndarray, QcReport]:
    """GeneCompass's QC over one file: one streaming pass of ``reader`` (a :mod:`scfm_fast.readers`
    reader), returning the per-cell keep mask and the report."""
    counted, mito = qc_gene_flags(list(reader.var_names))
    return _keep_from_parts([cell_qc_stats(c.indptr, c.indices, c.data, counted=counted, mito=mito)
                             for c in reader.iter_chunks(chunk_size=chunk_size)])


def _keep_from_parts(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, QcReport]:
    """:func:`genecompass_keep` over the concatenated per-chunk statistics."""
    if not parts:
        return np.zeros(0, dtype=bool), QcReport(0, 0, 0, 0, 0)
    return genecompass_keep(*(np.concatenate(x) for x in zip(*parts)))


def matrix_qc(X, gene_ids: Sequence[str], *, chunk_size: int = 10_000) -> tuple[np.ndarray, QcReport]:
    """GeneCompass's QC over an in-memory cells x genes matrix (dense or sparse), in row chunks."""
    import scipy.sparse as sp

    counted, mito = qc_gene_flags(list(gene_ids))
    parts = []
    for start in range(0, X.shape[0], chunk_size):
        block = X[start:start + chunk_size]
        block = block.tocsr() if sp.issparse(block) else sp.csr_matrix(block)
        parts.append(cell_qc_stats(block.indptr, block.indices, block.data, counted=counted, mito=mito))
    return _keep_from_parts(parts)


def check_qc_mode(qc: str | None) -> None:
    """Refuse an unknown ``--qc`` value (``None``: no QC)."""
    if qc is not None and qc not in QC_MODES:
        from .._errors import UsageError

        msg = f"--qc must be one of {list(QC_MODES)}, got {qc!r}"
        raise UsageError(msg)
