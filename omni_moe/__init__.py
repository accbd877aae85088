"""omni-moe: exact, fast kernels for OmniMoE layers (arXiv 2602.05711)."""

from .layers import OmniMoE, OmniMoEConfig
from .ops import omni_expert, omni_router, swiglu
from .ops._checks import UnroutedExpertsWarning
from .optim import param_groups

__version__ = "0.1.0"

__all__ = ["omni_router", "omni_expert", "swiglu", "OmniMoE", "OmniMoEConfig", "param_groups",
           "UnroutedExpertsWarning", "__version__"]
