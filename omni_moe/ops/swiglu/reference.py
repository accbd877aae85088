"""SwiGLU in plain PyTorch: the test oracle.

``swiglu_naive`` is ``act(gate) * up`` as a PyTorch user writes it, differentiable through
autograd, every op in the inputs' dtype: on float64 copies it is the oracle the kernels
and the PyTorch path (``cpu.py``: float32 math, one rounding) are compared with.

``swiglu_forward_torch`` / ``swiglu_backward_torch`` live in ``cpu.py``; they are
re-exported here for code that imports them from this module.
"""

from __future__ import annotations

from .._activations import activation
from .cpu import swiglu_backward_torch, swiglu_forward_torch

__all__ = ["swiglu_naive", "swiglu_forward_torch", "swiglu_backward_torch"]


def swiglu_naive(gate, up, act="silu"):
    """``act(gate) * up`` in the inputs' (common) dtype; differentiable in both."""
    return activation(gate, act) * up
