import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Kernel tests run on CUDA when present, else on CPU through Triton's interpreter.
HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state (tests that draw from torch's
    global generator are reproducible; most use their own seeded generators)."""
    torch.manual_seed(0)


@pytest.fixture
def device():
    if HAS_CUDA:
        return "cuda"
    if not INTERPRET:
        pytest.fail("kernel tests need CUDA or TRITON_INTERPRET=1 (see README)")
    return "cpu"


@pytest.fixture
def no_tf32():
    """float32 matmuls in full precision for the test (comparisons against float64)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
