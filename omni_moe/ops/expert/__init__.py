"""The atomic experts: ``op`` (public function, custom ops, autograd), ``kernels`` (Triton
kernels and launch rules), ``cpu`` (the PyTorch path of CPU tensors) and ``reference``
(the test oracle)."""

from .op import omni_expert

__all__ = ["omni_expert"]
