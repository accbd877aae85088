"""Decoders whose MLPs are OmniMoE layers, built from transformers' own decoder blocks.

For each supported family (Llama, Qwen2, Mistral, Qwen3) the classes here subclass the
family's ``<Family>Model`` and ``<Family>ForCausalLM``: attention, RMSNorm, rotary
embeddings, caches, masks and the decoder layer are transformers' own; only the
``mlp`` of the chosen layers (``config.moe_layers``, default all) is an
``OmniMoEBlock``.  A dense MLP's ``gate_proj``/``up_proj``/``down_proj`` modules become
the block's shared branch unchanged, so parameter names and checkpoint keys of the
attention and the shared branch are the family's.

The Llama family is the native model: ``OmniMoEModel`` / ``OmniMoEForCausalLM`` with
``OmniMoELMConfig`` (``model_type="omni_moe"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import initialization as hf_init
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder

from ..layers.omni_moe import OmniMoE, OmniMoEConfig, RouterNorm
from ..ops._checks import UnroutedExpertsWarning
from ..ops.router.op import omni_router
from .configuration import FAMILIES, config_class_for
from .losses import router_aux_loss, router_z_loss


def _in_backward() -> bool:
    """True while autograd's engine runs a backward pass (where checkpointed layers are
    recomputed)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class RouterLogitsProbe(nn.Module):
    """Where ``output_router_logits`` records a layer's router output: (T, 2N) float32,
    the log-probabilities ``[log p_x | log p_y]`` of the two axes.  No parameters.

    Called only while a forward hook is attached (transformers attaches one the first
    time router logits are requested), so the concatenation costs nothing otherwise."""

    def forward(self, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
        return torch.cat((px, py), dim=-1)


class NormalizedRouterLogitsProbe(nn.Module):
    """Where a model with ``router_z_loss_coef`` > 0 records a layer's normalised router
    logits for the z-loss: (T, 2N) float32 ``[l_x | l_y]``, l_a = norm(W_a h), the
    input of the log_softmax (recorded as ``normalized_router_logits``).  No
    parameters."""

    def forward(self, lx: torch.Tensor, ly: torch.Tensor) -> torch.Tensor:
        return torch.cat((lx, ly), dim=-1)


class OmniMoEBlock(OmniMoE):
    """``OmniMoE`` used as a decoder layer's ``mlp``; exposes its router output to
    transformers' output recording (``RouterLogitsProbe``, and
    ``NormalizedRouterLogitsProbe`` when the model's config asks for a z-loss).

    ``lm_config``: the model's config, read at every call for ``router_z_loss_coef``
    (so a coefficient set after the model was built applies); None: no z-loss."""

    def __init__(self, config: OmniMoEConfig, lm_config=None):
        super().__init__(config)
        self.router_probe = RouterLogitsProbe()
        self.normalized_logits_probe = NormalizedRouterLogitsProbe()
        self.lm_config = lm_config

    def wants_z_loss(self) -> bool:
        """True when the model's config has ``router_z_loss_coef`` != 0.  A property of the
        config, not of the call, so a checkpointed layer recomputed in backward takes the
        same path as its forward did."""
        return bool(getattr(self.lm_config, "router_z_loss_coef", 0.0))

    @contextlib.contextmanager
    def _running_stats_kept(self):
        norms = (self.router_norm_x, self.router_norm_y)
        if not (self.training and _in_backward() and all(isinstance(m, RouterNorm) for m in norms)):
            yield
            return
        # Activation checkpointing recomputes this forward inside backward; BatchNorm's
        # running statistics were already updated by the first forward, so keep them.
        saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                 for m in norms]
        yield
        with torch.no_grad():
            for m, mean, var, nbt in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(nbt)

    def route(self, h: torch.Tensor):
        """``OmniMoE.route`` (the single-node router stage where its plan allows), except
        where a probe asks for what the stage keeps to itself: the normalised logits for
        a z-loss, or the log-probabilities for ``output_router_logits``."""
        with self._running_stats_kept():
            if self.wants_z_loss():
                # The z-loss needs the logits before the log_softmax: PyTorch ops here
                # (the same values).
                lx, ly = self.normalized_router_logits(h)
                if self.normalized_logits_probe._forward_hooks:
                    self.normalized_logits_probe(lx, ly)
                px, py = F.log_softmax(lx, dim=-1), F.log_softmax(ly, dim=-1)
            elif self.router_probe._forward_hooks:
                px, py = self.router_log_probs(h)
            else:
                return super().route(h)
        if self.router_probe._forward_hooks:
            self.router_probe(px, py)
        return omni_router(px, py, self.num_expert_sqrt, self.top_k, sorted=False)


def layer_config(config) -> OmniMoEConfig:
    """The ``OmniMoEConfig`` of every OmniMoE layer of a model with this HF config."""
    with warnings.catch_warnings():
        # The model's config gave its UnroutedExpertsWarning when it was built.
        warnings.simplefilter("ignore", UnroutedExpertsWarning)
        return OmniMoEConfig(hidden_size=config.hidden_size,
                             intermediate_size=config.intermediate_size,
                             hidden_act=config.hidden_act, num_experts=config.num_experts,
                             num_experts_per_token=config.num_experts_per_tok,
                             router_norm=config.router_norm,
                             expert_precision=getattr(config, "expert_precision", "exact"))


def check_dense_mlp(mlp: nn.Module, idx: int) -> None:
    """TypeError/ValueError unless ``mlp`` is a bias-free Llama-style SwiGLU MLP."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, name, None)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"model: layer {idx}'s mlp has no nn.Linear {name} "
                            f"({type(mlp).__name__}); only Llama-style SwiGLU MLPs convert")
        if lin.bias is not None:
            raise ValueError(f"model: layer {idx}'s mlp.{name} has a bias (mlp_bias=True); "
                             "OmniMoE's shared branch has none")


def install_blocks(base_model: nn.Module, config, layer_ids) -> list[OmniMoEBlock]:
    """Replace ``base_model.layers[i].mlp`` for i in ``layer_ids`` by OmniMoE blocks that
    take over the dense MLP's three Linear modules as their shared branch.  The router
    and expert tables are new, on the dense weights' device and dtype."""
    lc = layer_config(config)
    blocks = []
    for i in layer_ids:
        layer = base_model.layers[i]
        dense = layer.mlp
        check_dense_mlp(dense, i)
        w = dense.gate_proj.weight
        with torch.device(w.device):
            block = OmniMoEBlock(lc, config)
        block.to(dtype=w.dtype)
        block.gate_proj, block.up_proj, block.down_proj = dense.gate_proj, dense.up_proj, dense.down_proj
        layer.mlp = block
        blocks.append(block)
    return blocks


def moe_layer_ids(config) -> list[int]:
    n = config.num_hidden_layers
    return list(range(n)) if config.moe_layers is None else list(config.moe_layers)


def _init_block_weights(block: OmniMoEBlock, config) -> None:
    # Inputs to the MLP are RMS-normalised (entries ~1), so u . h ~ N(0, 1) with
    # std 1/sqrt(H); the output table starts like the model's other output projections.
    hf_init.normal_(block.up_embed.weight, std=1.0 / math.sqrt(config.hidden_size))
    hf_init.normal_(block.down_embed.weight, std=config.initializer_range)


_CLASSES: dict[str, tuple[type, type]] = {}

_FP32_MODULES = ["router_norm_x", "router_norm_y"]


def _cache_names(base_model_cls) -> tuple[str, str]:
    """(argument, output field) under which this transformers release passes the KV cache:
    ``cache`` from 5.24 on, ``past_key_values`` before."""
    arg = "cache" if "cache" in inspect.signature(base_model_cls.forward).parameters else "past_key_values"
    fields = {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)}
    return arg, "cache" if "cache" in fields else "past_key_values"


def _record_router_logits(base_cls) -> dict:
    return {**base_cls._can_record_outputs, "router_logits": OutputRecorder(RouterLogitsProbe, index=0),
            "normalized_router_logits": OutputRecorder(NormalizedRouterLogitsProbe, index=0)}


@dataclass
class OmniMoECausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """``MoeCausalLMOutputWithPast`` plus ``z_loss``: the router z-loss
    (``omni_moe.hf.router_z_loss``, float32 scalar) when ``config.router_z_loss_coef`` > 0,
    else None.  Named as transformers' Switch/NLLB-MoE outputs name theirs
    (``encoder_z_loss``, ``decoder_z_loss``)."""

    z_loss: torch.Tensor | None = None


def model_classes(family: str) -> tuple[type, type]:
    """(base model class, causal-LM class) with OmniMoE MLPs for a supported family."""
    if family in _CLASSES:
        return _CLASSES[family]
    mod, prefix, _, ours = FAMILIES[family]
    hf = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    BaseModel = getattr(hf, f"{prefix}Model")
    BaseLM = getattr(hf, f"{prefix}ForCausalLM")
    Config = config_class_for(family)
    cache_arg, cache_field = _cache_names(BaseModel)
    rename_old_cache_arg = (deprecate_kwarg("past_key_values", "5.40.0", new_name="cache",
                                            raise_if_both_names=True)
                            if cache_arg == "cache" else (lambda f: f))

    class Model(BaseModel):
        config_class = Config
        _can_record_outputs = _record_router_logits(BaseModel)
        _keep_in_fp32_modules = _FP32_MODULES

        def __init__(self, config):
            super().__init__(config)
            for block in install_blocks(self, config, moe_layer_ids(config)):
                for m in reversed(list(block.modules())):
                    self._init_weights(m)

        def _init_weights(self, module):
            super()._init_weights(module)
            if isinstance(module, OmniMoEBlock):
                _init_block_weights(module, self.config)

    class ForCausalLM(BaseLM):
        config_class = Config
        _keep_in_fp32_modules = _FP32_MODULES

        def __init__(self, config):
            # BaseLM.__init__ minus the dense base model: the same three attributes.
            super(BaseLM, self).__init__(config)
            self.model = Model(config)
            self.vocab_size = config.vocab_size
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def _init_weights(self, module):
            super()._init_weights(module)
            if isinstance(module, OmniMoEBlock):
                _init_block_weights(module, self.config)

        # Both cache names work on every release (generate() passes the release's own);
        # where the release renamed past_key_values, it is deprecated as in the families.
        @rename_old_cache_arg
        @can_return_tuple
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                    inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                    output_router_logits=None, past_key_values=None,
                    **kwargs) -> OmniMoECausalLMOutputWithPast:
            """The family's causal-LM forward plus ``output_router_logits`` (per OmniMoE
            layer, (tokens, 2N) log-probabilities) and, with it, ``aux_loss``
            (``router_aux_loss``), added to ``loss`` times ``router_aux_loss_coef``; with
            ``router_z_loss_coef`` > 0, ``z_loss`` (``router_z_loss``), added to ``loss``
            times that coefficient.  The KV cache may be passed as ``cache`` or
            ``past_key_values``; the output holds it under the field name of the installed
            transformers release."""
            if past_key_values is not None:
                if cache is not None:
                    raise ValueError("pass the KV cache as cache or as past_key_values, not both")
                cache = past_key_values
            if output_router_logits is None:
                output_router_logits = self.config.output_router_logits
            z_coef = self.config.router_z_loss_coef
            record = {"output_normalized_router_logits": True} if z_coef else {}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_router_logits=output_router_logits,
                             **{cache_arg: cache}, **record, **kwargs)
            hidden = out.last_hidden_state
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :])
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels,
                                          vocab_size=self.config.vocab_size, **kwargs)
            router_logits = getattr(out, "router_logits", None) if output_router_logits else None
            aux = None
            if router_logits:
                aux = router_aux_loss(router_logits, self.config.num_experts_per_tok, attention_mask)
                if loss is not None and self.config.router_aux_loss_coef:
                    loss = loss + self.config.router_aux_loss_coef * aux.to(loss.device)
            z = None
            if z_coef:
                z = router_z_loss(getattr(out, "normalized_router_logits", ()), attention_mask)
                if loss is not None:
                    loss = loss + z_coef * z.to(loss.device)
            return OmniMoECausalLMOutputWithPast(
                loss=loss, aux_loss=aux, logits=logits, hidden_states=out.hidden_states,
                attentions=out.attentions, router_logits=router_logits, z_loss=z,
                **{cache_field: getattr(out, cache_field)})

    for cls, kind in ((Model, "Model"), (ForCausalLM, "ForCausalLM")):
        cls.__name__ = cls.__qualname__ = f"{ours}{kind}"
        cls.__module__ = __name__
        cls.__doc__ = (f"``{prefix}{kind}`` whose decoder layers listed in ``config.moe_layers`` "
                       f"(default all) have an ``OmniMoEBlock`` as their mlp.")
    _CLASSES[family] = (Model, ForCausalLM)
    return Model, ForCausalLM


OmniMoEModel, OmniMoEForCausalLM = model_classes("llama")
# The converted families' models under their own names (docs/hf.md's table).
OmniMoEQwen2Model, OmniMoEQwen2ForCausalLM = model_classes("qwen2")
OmniMoEMistralModel, OmniMoEMistralForCausalLM = model_classes("mistral")
OmniMoEQwen3Model, OmniMoEQwen3ForCausalLM = model_classes("qwen3")
