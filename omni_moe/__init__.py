"""omni-moe: exact, fast kernels for OmniMoE layers (arXiv 2602.05711)."""

from .router import omni_router
from .expert import omni_expert
from .mlp import swiglu
from .modules import OmniMoE, OmniMoEConfig
from .optim import param_groups

__version__ = "0.1.0"

__all__ = ["omni_router", "omni_expert", "swiglu", "OmniMoE", "OmniMoEConfig", "param_groups",
           "__version__"]
