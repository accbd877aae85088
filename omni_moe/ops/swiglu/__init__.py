"""The fused SwiGLU activation of the shared dense MLP: ``op`` (public functions, custom
ops, autograd), ``kernels`` (Triton kernels and launch rule), ``cpu`` (the PyTorch path
of CPU tensors) and ``reference`` (the test oracle)."""

from .op import swiglu, swiglu_mlp

__all__ = ["swiglu", "swiglu_mlp"]
