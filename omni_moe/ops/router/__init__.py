"""The omni router: ``op`` (public function, custom ops, autograd), ``pruned`` (the fast
exact kernels and their launch rules), ``fullscan`` (the full-scan baseline), ``backward``
(the shared backward kernel) and ``reference`` (the PyTorch semantics)."""

from .op import omni_router

__all__ = ["omni_router"]
