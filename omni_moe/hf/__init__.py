"""OmniMoE in Hugging Face transformers models (needs ``pip install 'omni-moe[hf]'``).

    import omni_moe.hf
    model = omni_moe.hf.apply_omnimoe(llama, num_experts=4096, num_experts_per_tok=16)
    model = AutoModelForCausalLM.from_config(omni_moe.hf.OmniMoELMConfig(...))

Importing this module registers the OmniMoE configs and models with ``AutoConfig``,
``AutoModel`` and ``AutoModelForCausalLM`` (model types "omni_moe" and
"omni_moe_qwen2", "omni_moe_mistral", "omni_moe_qwen3" for converted models), so saved
models load back with the Auto classes.  See docs/hf.md.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("omni_moe.hf needs transformers: pip install 'omni-moe[hf]'") from e

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import (FAMILIES, OmniMoELMConfig, OmniMoEMistralConfig, OmniMoEQwen2Config,
                            OmniMoEQwen3Config, config_class_for)
from .convert import apply_omnimoe
from .losses import ExpertUsage, expert_usage, router_aux_loss, router_z_loss
from .modeling import (NormalizedRouterLogitsProbe, OmniMoEBlock, OmniMoEForCausalLM,
                       OmniMoEMistralForCausalLM, OmniMoEMistralModel, OmniMoEModel,
                       OmniMoEQwen2ForCausalLM, OmniMoEQwen2Model, OmniMoEQwen3ForCausalLM,
                       OmniMoEQwen3Model,
                       RouterLogitsProbe, model_classes)


def _register() -> None:
    for family, (_, _, model_type, _) in FAMILIES.items():
        config_cls = config_class_for(family)
        model_cls, lm_cls = model_classes(family)
        AutoConfig.register(model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)


_register()

__all__ = ["apply_omnimoe", "OmniMoELMConfig", "OmniMoEModel", "OmniMoEForCausalLM",
           "OmniMoEQwen2Config", "OmniMoEQwen2Model", "OmniMoEQwen2ForCausalLM",
           "OmniMoEMistralConfig", "OmniMoEMistralModel", "OmniMoEMistralForCausalLM",
           "OmniMoEQwen3Config", "OmniMoEQwen3Model", "OmniMoEQwen3ForCausalLM",
           "OmniMoEBlock", "RouterLogitsProbe", "NormalizedRouterLogitsProbe", "router_aux_loss",
           "router_z_loss", "expert_usage", "ExpertUsage",
           "model_classes", "config_class_for"]
