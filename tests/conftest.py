"""Shared fixtures: seeds, CPU Triton interpreter, real-data locations, the ``cuda`` marker."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

# Triton kernels are tested on the CPU through the interpreter: this must be set before triton
# is imported anywhere, so it lives at the top of conftest.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# a Triton kernel that does not build must fail its tests, not fall back to PyTorch ops quietly
os.environ.setdefault("SCFM_FAST_TRITON_STRICT", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCFM_SHARED", REPO.parent / "shared"))
TEST_DATA = Path(__file__).resolve().parent / "data"


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np

    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover
        pass
    yield


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` (data and dictionaries); tests that need it skip when it is absent."""
    if not SHARED.exists():
        pytest.skip(f"shared data folder not found at {SHARED} (set SCFM_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def geneformer_v1_dir(shared_dir) -> Path:
    p = shared_dir / "geneformer_v1"
    if not (p / "token_dictionary.pkl").exists():
        pytest.skip(f"Geneformer V1 dictionaries not found in {p}")
    return p


@pytest.fixture
def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def pbmc_path() -> Path:
    """Real 10x PBMC counts (200 cells), bundled in the package so these tests never skip."""
    from importlib.resources import files

    return Path(str(files("scfm_fast") / "data" / "demo" / "pbmc_200cells.h5ad"))
