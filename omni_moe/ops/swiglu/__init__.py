"""The fused SwiGLU activation of the shared dense MLP: ``op`` (public functions, custom
ops, autograd) and ``kernels`` (Triton kernels and launch rule)."""

from .op import swiglu, swiglu_mlp

__all__ = ["swiglu", "swiglu_mlp"]
