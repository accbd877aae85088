"""nn.Module layers built on the omni-moe ops."""

from .omni_moe import OmniMoE, OmniMoEConfig, RouterLayerNorm, RouterNorm

__all__ = ["OmniMoE", "OmniMoEConfig", "RouterLayerNorm", "RouterNorm"]
