"""The public upstream project's import path ``omni_moe.modules.omni_moe``: ``OmniMoE``
and ``OmniMoEConfig`` (same parameter names and state_dict), from ``omni_moe.layers``."""

from ..layers.omni_moe import OmniMoE, OmniMoEConfig

__all__ = ["OmniMoE", "OmniMoEConfig"]
