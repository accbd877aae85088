"""The public upstream project's import path of the layer (``omni_moe.modules``); the
layer lives in ``omni_moe.layers``."""

from ..layers.omni_moe import OmniMoE, OmniMoEConfig, RouterLayerNorm, RouterNorm

__all__ = ["OmniMoE", "OmniMoEConfig", "RouterLayerNorm", "RouterNorm"]
