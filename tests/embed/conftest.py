import pytest


@pytest.fixture(autouse=True)
def _plain_torch_kernels(monkeypatch):
    """Embedding tests check pooling and plumbing; the Triton kernels have their own tests, and the
    CPU interpreter is too slow for real-sized cells."""
    monkeypatch.setenv("SCFM_FAST_TRITON", "0")
