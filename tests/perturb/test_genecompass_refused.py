"""`scfm perturb` / `perturb_cells` with a GeneCompass checkpoint: a clear refusal, not a traceback."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast._errors import UsageError
from scfm_fast.perturb import perturb_cells


def test_a_genecompass_model_is_refused_clearly(shared_dir):
    src = shared_dir / "genecompass_fixture" / "model"
    if not src.is_dir():
        pytest.skip(f"{src} not found")
    from scfm_fast.model.checkpoint import load_encoder

    model = load_encoder(src)
    cells = [np.arange(2, 12, dtype=np.int64)]
    with pytest.raises(UsageError, match="GeneCompass.*not implemented yet"):
        perturb_cells(cells, model, genes="all", progress_bar=False)
