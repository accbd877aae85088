"""Configurations of decoders whose MLPs are OmniMoE layers.

Each supported family (Llama, Qwen2, Mistral, Qwen3) gets a subclass of its own config
class that adds the OmniMoE fields, so every field name of the base config keeps its
meaning.  The Llama one is the native ``OmniMoELMConfig`` (``model_type="omni_moe"``);
the others are what ``apply_omnimoe`` turns a converted model's config into
(``model_type="omni_moe_<family>"``).

Added fields:
    num_experts: E, a perfect square N*N (the router's grid).
    num_experts_per_tok: k, experts per token (1 <= k <= E).
    router_norm: "layernorm" (default: per-token, causal), "batchnorm" (the paper's;
        batch statistics in training) or "none".  See docs/hf.md.
    moe_layers: indices of the decoder layers whose MLP is an OmniMoE layer; None = all.
    output_router_logits: return each OmniMoE layer's router log-probabilities.
    router_aux_loss_coef: weight of the load-balancing loss added to the LM loss when
        router logits are returned (``omni_moe.hf.router_aux_loss``).
"""

from __future__ import annotations

import importlib
import math

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from ..layers.omni_moe import ROUTER_NORMS

HF_ROUTER_NORMS = ROUTER_NORMS
# The activations both the HF MLPs and the OmniMoE kernels implement identically
# (transformers' "gelu" is the exact erf GELU, as ours).
SUPPORTED_ACTS = ("silu", "gelu", "relu")


def validate_omnimoe_fields(num_experts, num_experts_per_tok, router_norm, moe_layers,
                            num_hidden_layers, hidden_act, router_aux_loss_coef=0.0):
    """Raise TypeError/ValueError naming the first bad field."""
    from ..ops.router.op import MAX_NUM_EXPERT_SQRT

    for name, v in (("num_experts", num_experts), ("num_experts_per_tok", num_experts_per_tok)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 1 <= num_experts <= MAX_NUM_EXPERT_SQRT**2:
        raise ValueError(f"num_experts must be in [1, {MAX_NUM_EXPERT_SQRT**2}], got {num_experts}")
    n = math.isqrt(num_experts)
    if n * n != num_experts:
        raise ValueError(f"num_experts must be a perfect square (the router's N x N grid), got "
                         f"{num_experts}; nearest: {n * n} or {(n + 1) ** 2}")
    if not 1 <= num_experts_per_tok <= num_experts:
        raise ValueError(f"num_experts_per_tok must be in [1, {num_experts}], got {num_experts_per_tok}")
    if not isinstance(router_norm, str):
        raise TypeError(f"router_norm must be a str, one of {HF_ROUTER_NORMS}, got {type(router_norm).__name__}")
    if router_norm not in HF_ROUTER_NORMS:
        raise ValueError(f"router_norm must be one of {HF_ROUTER_NORMS}, got {router_norm!r}")
    if hidden_act not in SUPPORTED_ACTS:
        raise ValueError(f"hidden_act must be one of {SUPPORTED_ACTS} for OmniMoE layers, got {hidden_act!r}")
    if isinstance(router_aux_loss_coef, bool) or not isinstance(router_aux_loss_coef, (int, float)):
        raise TypeError(f"router_aux_loss_coef must be a float, got {type(router_aux_loss_coef).__name__}")
    if moe_layers is not None:
        if not isinstance(moe_layers, (list, tuple)):
            raise TypeError(f"moe_layers must be a list of layer indices or None, got {type(moe_layers).__name__}")
        for i in moe_layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"moe_layers must hold ints, got {type(i).__name__}")
            if not 0 <= i < num_hidden_layers:
                raise ValueError(f"moe_layers: layer {i} is out of range [0, {num_hidden_layers})")
        if len(set(moe_layers)) != len(moe_layers):
            raise ValueError(f"moe_layers has duplicates: {list(moe_layers)}")


def _config_class(base, model_type: str, name: str, doc: str):
    @strict
    class Config(base):
        num_experts: int = 1024
        num_experts_per_tok: int = 16
        router_norm: str = "layernorm"
        moe_layers: list[int] | None = None
        output_router_logits: bool = False
        router_aux_loss_coef: float = 0.0

        def __post_init__(self, **kwargs):
            validate_omnimoe_fields(self.num_experts, self.num_experts_per_tok, self.router_norm,
                                    self.moe_layers, self.num_hidden_layers, self.hidden_act,
                                    self.router_aux_loss_coef)
            if self.moe_layers is not None:
                self.moe_layers = sorted(self.moe_layers)
            super().__post_init__(**kwargs)

    Config.model_type = model_type
    Config.__name__ = Config.__qualname__ = name
    Config.__doc__ = doc
    Config.__module__ = __name__
    return Config


OmniMoELMConfig = _config_class(
    LlamaConfig, "omni_moe", "OmniMoELMConfig",
    """Config of ``OmniMoEForCausalLM``: ``LlamaConfig``'s fields plus num_experts,
    num_experts_per_tok, router_norm, moe_layers, output_router_logits,
    router_aux_loss_coef (see the module docstring).  ``intermediate_size`` is the width
    of each layer's shared SwiGLU branch.""")

# family model_type -> (transformers module, class prefix, our model_type, our prefix)
FAMILIES = {
    "llama": ("llama", "Llama", "omni_moe", "OmniMoE"),
    "qwen2": ("qwen2", "Qwen2", "omni_moe_qwen2", "OmniMoEQwen2"),
    "mistral": ("mistral", "Mistral", "omni_moe_mistral", "OmniMoEMistral"),
    "qwen3": ("qwen3", "Qwen3", "omni_moe_qwen3", "OmniMoEQwen3"),
}

_CONFIGS = {"llama": OmniMoELMConfig}


def config_class_for(family: str):
    """The OmniMoE config class of a supported family ("llama", "qwen2", ...)."""
    if family not in _CONFIGS:
        mod, prefix, model_type, ours = FAMILIES[family]
        base = getattr(importlib.import_module(f"transformers.models.{mod}"), f"{prefix}Config")
        _CONFIGS[family] = _config_class(
            base, model_type, f"{ours}Config",
            f"``{prefix}Config`` plus the OmniMoE fields (see omni_moe.hf.configuration).")
    return _CONFIGS[family]


# The converted families' configs under their own names (docs/hf.md's table).
OmniMoEQwen2Config = config_class_for("qwen2")
OmniMoEMistralConfig = config_class_for("mistral")
OmniMoEQwen3Config = config_class_for("qwen3")
