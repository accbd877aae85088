"""The fused SwiGLU activation of the shared dense MLP: ``op`` (public functions, custom
ops, autograd), ``kernels`` (Triton kernels and launch rule) and ``reference`` (the
PyTorch semantics, also the CPU path)."""

from .op import swiglu, swiglu_mlp

__all__ = ["swiglu", "swiglu_mlp"]
