"""The public upstream project's import path of the layer (``omni_moe.modules``); the
layer lives in ``omni_moe.layers``."""

from ..layers.omni_moe import OmniMoE, OmniMoEConfig, RouterLayerNorm, RouterNorm
from .omni_moe import OmniMoE_Torch

__all__ = ["OmniMoE", "OmniMoEConfig", "OmniMoE_Torch", "RouterLayerNorm", "RouterNorm"]
