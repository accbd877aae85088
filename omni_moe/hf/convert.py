"""Turn the dense MLPs of a Llama-, Qwen2-, Mistral- or Qwen3-style model into OmniMoE
layers, in place, without changing its outputs.

How the conversion survives ``save_pretrained`` / ``from_pretrained``: the model's
config object becomes an instance of the family's OmniMoE config subclass (same fields
plus ``num_experts``, ``num_experts_per_tok``, ``router_norm``, ``moe_layers``, ...;
``model_type`` "omni_moe" for Llama, "omni_moe_<family>" otherwise) and the model's
class becomes the matching subclass (``OmniMoEForCausalLM``, ``OmniMoEQwen2ForCausalLM``,
...; still an instance of the original class).  ``save_pretrained`` therefore writes
that model_type and architecture, and ``AutoModelForCausalLM.from_pretrained`` (after
``import omni_moe.hf``, which registers them) rebuilds the same modules and loads every
weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops._checks import as_int, check_float, check_int
from .configuration import FAMILIES, config_class_for, validate_omnimoe_fields
from .modeling import _FP32_MODULES, check_dense_mlp, install_blocks, model_classes


def _family(model) -> tuple[str, bool]:
    """(family, is_causal_lm) of a supported transformers model, else TypeError/ValueError."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    mt = getattr(model.config, "model_type", None)
    ours = {v[2]: k for k, v in FAMILIES.items()}
    if mt in ours:
        raise ValueError(f"model already has OmniMoE layers (model_type {mt!r}); convert a dense model")
    if mt not in FAMILIES:
        names = ", ".join(FAMILIES)
        raise TypeError(f"model: unsupported architecture {type(model).__name__} (model_type {mt!r}); "
                        f"apply_omnimoe supports the model types {names}")
    base_model_cls, _ = model_classes(mt)
    BaseModel = base_model_cls.__mro__[1]
    if isinstance(model, BaseModel):
        return mt, False
    inner = getattr(model, "model", None)
    if isinstance(inner, BaseModel) and hasattr(model, "lm_head"):
        return mt, True
    raise TypeError(f"model must be a {BaseModel.__name__} or a causal LM holding one as .model, "
                    f"got {type(model).__name__}")


def _retag(module: nn.Module, cls: type) -> None:
    """Give an existing module the OmniMoE subclass of its class and let transformers'
    output recording know about it (router logits)."""
    from transformers.utils import output_capturing as oc

    module.__class__ = cls
    # The registry is keyed by the class's name; transformers 5.17 takes that key as
    # given and later versions derive it from the module, so write the key itself.
    dict.__setitem__(oc._CAN_RECORD_REGISTRY, str(cls), cls._can_record_outputs)
    module._keep_in_fp32_modules = set(getattr(module, "_keep_in_fp32_modules", None) or ()) | set(_FP32_MODULES)


def apply_omnimoe(model, *, layers=None, num_experts: int, num_experts_per_tok: int | None = None,
                  router_norm: str = "layernorm", output_router_logits: bool = False,
                  router_aux_loss_coef: float = 0.0, router_z_loss_coef: float = 0.0,
                  up_embed_std: float | None = None, num_experts_per_token: int | None = None,
                  expert_precision: str = "exact"):
    """Replace the MLP of decoder layers ``layers`` (default: all) of a Llama-, Qwen2-,
    Mistral- or Qwen3-style ``...ForCausalLM`` or ``...Model`` by OmniMoE layers, in place;
    returns the model.

    Each dense MLP's ``gate_proj``/``up_proj``/``down_proj`` become the layer's shared
    branch (the same Parameter objects).  The expert output table ``down_embed`` starts
    at zero, so the model computes exactly what it did before; ``up_embed`` is normal
    with std ``up_embed_std`` (default 1/sqrt(hidden_size)) and the router gates are
    ``nn.Linear``'s default, on the dense weights' device and dtype (seed torch's RNG for
    a reproducible conversion).

    Args:
        layers: decoder-layer indices to convert, or None for all.
        num_experts: E, a perfect square N*N (another count warns: ``OmniMoEConfig``).
        num_experts_per_tok: k (required); ``num_experts_per_token``, the layer config's
            name, is accepted instead.
        router_norm: "layernorm" (per token; default), "batchnorm" (the paper's) or "none".
        output_router_logits, router_aux_loss_coef, router_z_loss_coef,
            expert_precision: stored in the config (docs/hf.md).

    The config records all of it, so ``save_pretrained`` and, after ``import omni_moe.hf``,
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoModel.from_pretrained`` rebuild the
    converted model.  Raises TypeError for unsupported models, ValueError for bad options.
    """
    family, is_lm = _family(model)
    config = model.config
    n_layers = config.num_hidden_layers
    if layers is None:
        layer_ids = None
    else:
        if as_int(layers) is not None:
            layers = [layers]
        if not isinstance(layers, (list, tuple, range)):
            raise TypeError(f"layers must be a list of layer indices or None, got {type(layers).__name__}")
        layer_ids = [as_int(i) for i in layers]
        for i, typed in zip(layer_ids, layers):
            if i is None:
                raise TypeError(f"layers must hold ints, got {type(typed).__name__}")
            if not -n_layers <= i < n_layers:
                raise ValueError(f"layers: layer {i} is out of range for {n_layers} decoder layers")
        layer_ids = sorted({i % n_layers for i in layer_ids})
        if len(layer_ids) != len(layers):
            raise ValueError(f"layers has duplicates: {list(layers)}")
        if not layer_ids:
            raise ValueError("layers must name at least one decoder layer")
    if getattr(config, "mlp_bias", False):
        raise ValueError("model: mlp_bias=True is not supported (OmniMoE's shared branch has no bias)")
    k_name, k = "num_experts_per_tok", num_experts_per_tok
    if num_experts_per_token is not None:
        alias = check_int("num_experts_per_token", num_experts_per_token)
        if k is not None and check_int("num_experts_per_tok", k) != alias:
            raise ValueError(f"num_experts_per_token={alias} and num_experts_per_tok={k} name the "
                             f"same setting (k, experts per token); pass one")
        k_name, k = "num_experts_per_token", alias
    if k is None:
        raise TypeError("apply_omnimoe needs num_experts_per_tok (k, experts per token)")
    num_experts, k, _ = validate_omnimoe_fields(
        num_experts, k, router_norm, layer_ids, n_layers, config.hidden_act,
        router_aux_loss_coef, router_z_loss_coef, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, expert_precision=expert_precision,
        names={"num_experts_per_tok": k_name})
    if not isinstance(output_router_logits, bool):
        raise TypeError(f"output_router_logits must be a bool, got {type(output_router_logits).__name__}")
    if up_embed_std is not None:
        check_float("up_embed_std", up_embed_std, 0)

    base = model.model if is_lm else model
    ids = list(range(n_layers)) if layer_ids is None else layer_ids
    for i in ids:  # check every layer before touching any
        check_dense_mlp(base.layers[i].mlp, i)
    Model, ForCausalLM = model_classes(family)
    Config = config_class_for(family)

    # The config object is shared by every submodule (attention reads it too): retype it
    # in place rather than replacing it, so all of them see the recorded conversion.
    config.__class__ = Config
    config.num_experts = num_experts
    config.num_experts_per_tok = k
    config.router_norm = router_norm
    config.moe_layers = layer_ids
    config.output_router_logits = output_router_logits
    config.router_aux_loss_coef = float(router_aux_loss_coef)
    config.router_z_loss_coef = float(router_z_loss_coef)
    config.expert_precision = expert_precision

    blocks = install_blocks(base, config, ids)
    std = 1.0 / math.sqrt(config.hidden_size) if up_embed_std is None else float(up_embed_std)
    with torch.no_grad():
        for block in blocks:
            nn.init.normal_(block.up_embed.weight, std=std)
            nn.init.zeros_(block.down_embed.weight)
            block.train(model.training)

    _retag(base, Model)
    if is_lm:
        _retag(model, ForCausalLM)
    if getattr(base, "_output_capturing_hooks_installed", False):
        # transformers installs recording hooks once per model; add the new layers' ones.
        from transformers.utils.output_capturing import install_output_capuring_hook

        for block in blocks:
            install_output_capuring_hook(block.router_probe, "router_logits", 0)
            install_output_capuring_hook(block.normalized_logits_probe, "normalized_router_logits", 0)
    return model
