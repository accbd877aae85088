"""Configurations of decoders whose MLPs are OmniMoE layers.

Each supported family (Llama, Qwen2, Mistral, Qwen3) gets a subclass of its own config
class that adds the OmniMoE fields, so every field name of the base config keeps its
meaning.  The Llama one is the native ``OmniMoELMConfig`` (``model_type="omni_moe"``);
the others are what ``apply_omnimoe`` turns a converted model's config into
(``model_type="omni_moe_<family>"``).

Added fields:
    num_experts: E, a perfect square N*N (the router's grid); another count warns and
        routes over isqrt(E)**2 of its rows (``omni_moe.OmniMoEConfig``).
    num_experts_per_tok: k, experts per token (1 <= k <= N*N).
    router_norm: "layernorm" (default: per-token, causal), "batchnorm" (the paper's;
        batch statistics in training) or "none".  See docs/hf.md.
    moe_layers: indices of the decoder layers whose MLP is an OmniMoE layer; None = all.
    output_router_logits: return each OmniMoE layer's router log-probabilities.
    router_aux_loss_coef: weight of the load-balancing loss added to the LM loss when
        router logits are returned (``omni_moe.hf.router_aux_loss``).
    router_z_loss_coef: weight of the router z-loss added to the LM loss (0: off, and
        no extra work; ``omni_moe.hf.router_z_loss``).
    expert_precision: "exact" (default) or "bfloat16" (the atomic experts' coefficients
        may be rounded to bfloat16 where that saves time; ``omni_moe.OmniMoEConfig``).

Other names: ``num_experts_per_token`` (``omni_moe.OmniMoEConfig``'s) is accepted for
``num_experts_per_tok`` (and reads it back); the keys other MoE configs use either map to
these fields (``num_local_experts``, ``decoder_sparse_step``, ...) or are rejected with
what to use instead (``moe_intermediate_size``, ...): ``ALIASES``, ``LAYER_KEYS``,
``FIXED``, ``REJECTED`` below, and docs/hf.md.  Integer fields accept numpy and torch
integer scalars and store Python ints.
"""

from __future__ import annotations

import functools
import importlib

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from ..layers.omni_moe import OmniMoEConfig
from ..ops._checks import as_int, check_float, check_int


def validate_omnimoe_fields(num_experts, num_experts_per_tok, router_norm, moe_layers,
                            num_hidden_layers, hidden_act, router_aux_loss_coef=0.0,
                            router_z_loss_coef=0.0, *, hidden_size=1, intermediate_size=1,
                            expert_precision="exact", names=None, stacklevel=2):
    """Raise TypeError/ValueError naming the first bad field, by the name the caller typed
    (``names``: field -> that name, where it differs); return ``(num_experts,
    num_experts_per_tok, moe_layers)`` with Python ints (numpy and torch integer scalars
    are accepted).  The layer fields are checked by building the ``OmniMoEConfig`` of
    the decoder's OmniMoE layers, so both accept and reject the same values (the HF MLPs
    and the OmniMoE kernels implement its activations identically: transformers' "gelu"
    is the exact erf GELU, as ours); ``hidden_size`` and ``intermediate_size`` are the
    decoder's (their defaults stand in where only the routing fields are checked, e.g. a
    command line).  A ``num_experts`` that is not a perfect square warns
    (``UnroutedExpertsWarning``; ``stacklevel`` as ``warnings.warn``'s, 1 being the
    caller of this function)."""
    names = names or {}
    l_name = names.get("moe_layers", "moe_layers")
    layer = OmniMoEConfig.typed(
        names, stacklevel=stacklevel + 1, hidden_size=hidden_size,
        intermediate_size=intermediate_size, hidden_act=hidden_act, num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok, router_norm=router_norm,
        expert_precision=expert_precision)
    check_float("router_aux_loss_coef", router_aux_loss_coef)
    check_float("router_z_loss_coef", router_z_loss_coef, 0)
    if moe_layers is not None:
        if not isinstance(moe_layers, (list, tuple)):
            raise TypeError(f"{l_name} must be a list of layer indices or None, got {type(moe_layers).__name__}")
        layers = []
        for i in moe_layers:
            j = as_int(i)
            if j is None:
                raise TypeError(f"{l_name} must hold ints, got {type(i).__name__}")
            if not 0 <= j < num_hidden_layers:
                raise ValueError(f"{l_name}: layer {j} is out of range [0, {num_hidden_layers})")
            layers.append(j)
        if len(set(layers)) != len(layers):
            raise ValueError(f"{l_name} has duplicates: {layers}")
        moe_layers = layers
    return layer.num_experts, layer.num_experts_per_token, moe_layers


# Keys of other MoE configs (Mixtral, Qwen2/Qwen3-MoE, DeepSeek, OLMoE, PhiMoE) that people
# pass out of habit.  transformers keeps an unknown key as a plain attribute that nothing
# reads, so each of these either maps to an OmniMoE field or is rejected with what to use
# instead.  None is ever stored, so a saved config holds OmniMoE's names only.
ALIASES = {  # other name -> our field of the same meaning
    "num_experts_per_token": "num_experts_per_tok",     # omni_moe.OmniMoEConfig's name
    "num_local_experts": "num_experts",                 # Mixtral, PhiMoE, GraniteMoE
    "n_routed_experts": "num_experts",                  # DeepSeek
    "shared_expert_intermediate_size": "intermediate_size",   # Qwen2-MoE's shared expert
}
# Qwen-MoE / DeepSeek ways of choosing the sparse layers; they become moe_layers.
LAYER_KEYS = ("decoder_sparse_step", "mlp_only_layers", "first_k_dense_replace")
# Accepted only with the value that describes what OmniMoE does (and then not stored).
FIXED = {
    "norm_topk_prob": (False, "the omni router weights expert (i, j) by p_x(i) * p_y(j), "
                              "not renormalised over the k chosen"),
    "router_jitter_noise": (0, "the omni router adds no noise to its logits"),
    "input_jitter_noise": (0, "OmniMoE layers add no noise to their input"),
}
REJECTED = {
    "moe_intermediate_size":
        "OmniMoE's experts are single neurons (one input and one output vector each) and have "
        "no width: size the expert pool with num_experts (E = N*N) and num_experts_per_tok, "
        "and the shared SwiGLU branch with intermediate_size",
    "n_shared_experts": "an OmniMoE layer has one shared SwiGLU branch: set its width with intermediate_size",
    "moe_layer_freq": "list the OmniMoE layers in moe_layers",
    "routed_scaling_factor": "the omni router has no output scale: its weights are p_x(i) * p_y(j)",
    "n_group": "the omni router takes the exact top-k over all N*N experts (no expert groups)",
    "topk_group": "the omni router takes the exact top-k over all N*N experts (no expert groups)",
    "topk_method": "the omni router takes the exact top-k over all N*N experts",
    "scoring_func": "the omni router scores expert (i, j) by log p_x(i) + log p_y(j) (softmax per axis)",
    "aux_loss_alpha": "use router_aux_loss_coef (omni_moe.hf.router_aux_loss, per axis)",
}


def _layers_from(keys: dict, num_hidden_layers: int, given: dict):
    """moe_layers from Qwen-MoE's decoder_sparse_step / mlp_only_layers and DeepSeek's
    first_k_dense_replace (their rules: layer i is sparse when i is not in mlp_only_layers,
    (i + 1) % decoder_sparse_step == 0 and i >= first_k_dense_replace); None = all."""
    L = num_hidden_layers
    step = keys.get("decoder_sparse_step")
    step = 1 if step is None else check_int("decoder_sparse_step", step, 1)
    first = keys.get("first_k_dense_replace")
    first = 0 if first is None else check_int("first_k_dense_replace", first, 0, L)
    dense = keys.get("mlp_only_layers") or []
    if not isinstance(dense, (list, tuple)):
        raise TypeError(f"mlp_only_layers must be a list of layer indices, got {type(dense).__name__}")
    dense = {check_int("mlp_only_layers", i, 0, L - 1) for i in dense}
    layers = [i for i in range(L) if i not in dense and (i + 1) % step == 0 and i >= first]
    if "moe_layers" in given:
        ours = given["moe_layers"]
        if (list(range(L)) if ours is None else sorted(ours)) != layers:
            typed = ", ".join(f"{k}={keys[k]!r}" for k in LAYER_KEYS if k in keys)
            raise ValueError(f"moe_layers={ours!r} and {typed} choose different layers ({layers}); pass one")
    return None if len(layers) == L else layers


def _int_scalars_to_ints(v):
    """numpy / torch integer scalars (also inside a list or tuple) as Python ints; anything
    else unchanged (the field checks judge it)."""
    if isinstance(v, (list, tuple)):
        return type(v)(_int_scalars_to_ints(x) for x in v)
    i = as_int(v)
    return v if i is None or type(v) is int else i


def _config_class(base, model_type: str, name: str, doc: str):
    @strict
    class Config(base):
        num_experts: int = 1024
        num_experts_per_tok: int = 16
        router_norm: str = "layernorm"
        moe_layers: list[int] | None = None
        output_router_logits: bool = False
        router_aux_loss_coef: float = 0.0
        router_z_loss_coef: float = 0.0
        expert_precision: str = "exact"

        def __post_init__(self, **kwargs):
            # _given: the keyword arguments of the call (see _accept_other_names), so that
            # a name typed twice, under two spellings, can be told from a default.
            given = kwargs.pop("_given", {})
            names = {}
            for other, ours in ALIASES.items():
                if other not in kwargs:
                    continue
                v = kwargs.pop(other)
                if ours in given and given[ours] != v:
                    raise ValueError(f"{other}={v!r} and {ours}={given[ours]!r} name the same "
                                     f"setting ({ours}); pass one")
                if ours in names:
                    raise ValueError(f"{names[ours]} and {other} name the same setting ({ours}); "
                                     f"pass one")
                setattr(self, ours, v)
                names[ours] = other
            keys = {k: kwargs.pop(k) for k in LAYER_KEYS if k in kwargs}
            if keys:
                self.moe_layers = _layers_from(keys, self.num_hidden_layers, given)
                names["moe_layers"] = "/".join(keys)
            for key, (value, why) in FIXED.items():
                if key in kwargs and kwargs.pop(key) != value:
                    raise ValueError(f"{key}: only {value!r} is supported ({why})")
            for key, why in REJECTED.items():
                if key in kwargs:
                    raise ValueError(f"{key} has no OmniMoE equivalent: {why}")
            # stacklevel 1: the frames between here and the caller depend on the
            # transformers version, so a warning points at this line.
            self.num_experts, self.num_experts_per_tok, self.moe_layers = validate_omnimoe_fields(
                self.num_experts, self.num_experts_per_tok, self.router_norm, self.moe_layers,
                self.num_hidden_layers, self.hidden_act, self.router_aux_loss_coef,
                self.router_z_loss_coef, hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size,
                expert_precision=self.expert_precision, names=names, stacklevel=1)
            if self.moe_layers is not None:
                self.moe_layers = sorted(self.moe_layers)
            super().__post_init__(**kwargs)

    _accept_other_names(Config)
    # num_experts_per_token reads and writes num_experts_per_tok (transformers' own
    # mechanism for a config's alternative attribute names; never serialised).
    Config.attribute_map = {**base.attribute_map, "num_experts_per_token": "num_experts_per_tok"}
    Config.model_type = model_type
    Config.__name__ = Config.__qualname__ = name
    Config.__doc__ = doc
    Config.__module__ = __name__
    return Config


def _accept_other_names(cls) -> None:
    """Wrap ``cls.__init__`` (transformers' keyword-only one) so that integer scalars of
    numpy or torch arrive as ints (transformers' strict field checks reject them) and
    ``__post_init__`` learns which keywords were passed."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        kwargs = {k: _int_scalars_to_ints(v) for k, v in kwargs.items()}
        init(self, *args, **kwargs, _given=dict(kwargs))

    cls.__init__ = __init__


OmniMoELMConfig = _config_class(
    LlamaConfig, "omni_moe", "OmniMoELMConfig",
    """Config of ``OmniMoEForCausalLM``: ``LlamaConfig``'s fields plus num_experts,
    num_experts_per_tok, router_norm, moe_layers, output_router_logits,
    router_aux_loss_coef, router_z_loss_coef, expert_precision (see the module docstring).  ``intermediate_size`` is the width
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
