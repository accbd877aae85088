"""omni-moe: exact, fast kernels for OmniMoE layers (arXiv 2602.05711)."""

from .router import omni_router

__version__ = "0.1.0"

__all__ = ["omni_router", "__version__"]
