"""Mouse -> human one-to-one ortholog mapping (Ensembl BioMart), for human-vocabulary models."""

from __future__ import annotations

from pathlib import Path

from .._errors import InputFileError
from .dictionaries import bundled_dir

BUNDLED_MOUSE_TO_HUMAN = "mouse-to-human"


def load_ortholog_map(source: str | Path = BUNDLED_MOUSE_TO_HUMAN) -> dict[str, str]:
    """Map mouse gene ids *and* symbols to human Ensembl ids (one-to-one orthologs only).

    Parameters
    ----------
    source
        ``"mouse-to-human"`` for the bundled table (Ensembl BioMart one-to-one orthologs, 17,122
        pairs), or a CSV/TSV path with either the bundled columns (``mouse_ensembl_id``,
        ``mouse_symbol``, ``human_ensembl_id``) or BioMart's export columns (``Gene stable ID``,
        ``Gene name``, ``Human gene stable ID``, ``Human homology type``).

    Returns
    -------
    dict
        mouse Ensembl id -> human Ensembl id, and mouse symbol -> human Ensembl id.
    """
    if str(source) == BUNDLED_MOUSE_TO_HUMAN:
        path = bundled_dir("orthologs") / "mouse_to_human_one2one.tsv.gz"
    else:
        path = Path(source)
    if not path.exists():
        msg = f"{path}: ortholog table not found; use 'mouse-to-human' for the bundled one"
        raise InputFileError(msg)
    sep = "\t" if ".tsv" in path.name else ","
    import pandas as pd  # on first use: the tokenize path starts without pandas

    df = pd.read_csv(path, sep=sep, dtype=str)
    if "Gene stable ID" in df.columns:  # BioMart export
        if "Human homology type" in df.columns:
            df = df[df["Human homology type"] == "ortholog_one2one"]
        df = df.rename(columns={"Gene stable ID": "mouse_ensembl_id", "Gene name": "mouse_symbol",
                                "Human gene stable ID": "human_ensembl_id"})
    need = {"mouse_ensembl_id", "human_ensembl_id"}
    if not need <= set(df.columns):
        msg = f"{path}: ortholog table needs columns {sorted(need)}, found {list(df.columns)}"
        raise InputFileError(msg)
    df = df.dropna(subset=["human_ensembl_id"])
    out: dict[str, str] = dict(zip(df["mouse_ensembl_id"], df["human_ensembl_id"]))
    if "mouse_symbol" in df.columns:
        sym = df.dropna(subset=["mouse_symbol"])
        # a symbol shared by several mouse genes is ambiguous: leave it out
        counts = sym["mouse_symbol"].value_counts()
        sym = sym[sym["mouse_symbol"].map(counts) == 1]
        out.update(zip(sym["mouse_symbol"], sym["human_ensembl_id"]))
    return out
