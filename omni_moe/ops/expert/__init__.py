"""The atomic experts: ``op`` (public function, custom ops, autograd), ``kernels`` (Triton
kernels and launch rules) and ``reference`` (the PyTorch semantics)."""

from .op import omni_expert

__all__ = ["omni_expert"]
