import pytest
import torch


@pytest.fixture(autouse=True)
def _kernel_device():
    """Kernel tests build tensors on CUDA when there is a GPU (real kernels), else on the CPU (where
    conftest turned on Triton's interpreter)."""
    if not torch.cuda.is_available():
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device("cpu")
