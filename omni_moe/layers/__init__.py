"""Layers built from the ops: ``omni_moe`` (the OmniMoE layer, its config and router
norms), ``router_stage`` / ``output_stage`` (the layer's fused autograd stages) and
``reference`` (the float64-capable oracle of the layer)."""

from .omni_moe import OmniMoE, OmniMoEConfig, RouterLayerNorm, RouterNorm

__all__ = ["OmniMoE", "OmniMoEConfig", "RouterLayerNorm", "RouterNorm"]
