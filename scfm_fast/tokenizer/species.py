"""The per-cell species of GeneCompass token datasets (0 = human, 1 = mouse) and its options."""

from __future__ import annotations

import numpy as np

from .._errors import InputFileError, UsageError
from ..readers.obs import ObsBlock
from ..vocab.ensembl import SPECIES, species_code

_CODES = {"human": 0, "mouse": 1, "0": 0, "1": 1, "homo sapiens": 0, "mus musculus": 1}


def check_species_options(preset, *, species: str | None, species_column: str | None,
                          normalize_total: float | None) -> None:
    """Refuse species / normalize_total options outside a value preset, and a value preset without
    exactly one species source (``preset``: a :class:`~scfm_fast.vocab.Preset`)."""
    given = [o for o, v in (("--species", species), ("--species-column", species_column),
                            ("--normalize-total", normalize_total)) if v is not None]
    if not preset.values:
        if given:
            msg = f"{', '.join(given)} only apply to --preset genecompass, not {preset.name!r}"
            raise UsageError(msg)
        return
    if (species is None) == (species_column is None):
        msg = (f"--preset {preset.name} records a species per cell: pass --species human|mouse, or "
               "--species-column naming an obs column of human/mouse (or 0/1), exactly one of them")
        raise UsageError(msg)
    if species is not None and species not in SPECIES:
        msg = f"--species must be one of {sorted(SPECIES)}, got {species!r}"
        raise UsageError(msg)
    if normalize_total is not None and not (np.isfinite(normalize_total) and normalize_total > 0):
        msg = f"--normalize-total must be a positive number (e.g. 10000), got {normalize_total!r}"
        raise UsageError(msg)


def species_codes(obs: ObsBlock, start: int, *, species: str | None, column: str | None,
                  path: str) -> np.ndarray:
    """int8 species code per cell: ``species`` for all, else parsed from ``obs[column]``.

    ``start`` is the source row of ``obs``'s first cell, for error messages naming ``path``.
    """
    if species is not None:
        return np.full(len(obs), species_code(species), dtype=np.int8)
    values = np.asarray(obs[column], dtype=object)
    codes = np.array([_CODES.get(str(v).strip().lower(), -1) for v in values], dtype=np.int8)
    if (codes < 0).any():
        i = int(np.flatnonzero(codes < 0)[0])
        msg = (f"{path}: cell '{obs.index[i]}' (row {start + i}) has {column}={values[i]!r}; the "
               "species column must hold human/mouse (or 0/1)")
        raise InputFileError(msg)
    return codes
