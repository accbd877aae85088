"""The router's per-axis norms as modules: ``RouterNorm`` (BatchNorm1d without affine,
float32) and ``RouterLayerNorm`` (per-token LayerNorm without affine); ``is_plain`` tells
whether a module runs only its own forward (the layer may then fuse its weights);
``check_expert_tables`` rejects expert tables whose weights the layer cannot read
directly (an adapter such as peft's LoRA wrapped around them)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RouterNorm(nn.BatchNorm1d):
    """``BatchNorm1d(N, affine=False)`` over router logits that computes in float32.

    Its running statistics (``running_mean``, ``running_var``, ``num_batches_tracked``)
    are buffers, not parameters: they are in the state_dict, no optimizer touches them,
    and they are updated in place by every forward in training mode.  They stay float32
    when the module is cast (``.to(torch.bfloat16)``, ``.half()``): router logits are
    normalised in float32 because bf16 logits produce many exact ties in the router.
    """

    def __init__(self, num_features: int):
        super().__init__(num_features, affine=False)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for name in ("running_mean", "running_var"):
            buf = self._buffers.get(name)
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.training and x.shape[0] == 0:
            # Batch statistics of an empty batch are NaN and would poison the running
            # statistics; an empty batch is normalised with (and leaves) the running ones.
            return F.batch_norm(x, self.running_mean, self.running_var, None, None, False, 0.0, self.eps)
        if (not self.training and self.running_var is not None and torch.is_grad_enabled()
                and x.requires_grad):
            # Eval-mode batch_norm saves the running statistics themselves for its
            # backward; a training-mode call before that backward updates them in place
            # without bumping their version, so the backward would silently use the new
            # ones.  Copies (N floats each) keep the forward's.
            return F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(), None, None,
                                False, 0.0, self.eps)
        return super().forward(x)


class RouterLayerNorm(nn.Module):
    """Per-token ``layer_norm`` over one axis's N router logits, no affine, in float32.

    No parameters or buffers (no state_dict keys).  Unlike ``RouterNorm`` it uses no
    other token's logits, so a token's routing never depends on later tokens of the
    batch.  Runs as torch ops on every device (the fused Triton prologue covers the
    batch statistics only)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.num_features,), eps=self.eps)


# The forwards the layer's fused paths reproduce from a module's weights.  A module of
# another class (peft's LoRA layers, quantised Linears) exposes ``weight`` but computes
# something else, so it must be called.
_FUSABLE_FORWARDS = (nn.Linear.forward, nn.Identity.forward, RouterNorm.forward,
                     RouterLayerNorm.forward)


def is_plain(m: nn.Module) -> bool:
    """True if calling ``m`` runs only its own forward (no hooks, no wrapper around it):
    the layer may then use its weights directly in fused calls."""
    return (any(type(m).forward is f for f in _FUSABLE_FORWARDS)
            and not (m._forward_hooks or m._forward_pre_hooks))


def _is_embedding(m: nn.Module) -> bool:
    return isinstance(m, nn.Embedding) and type(m).forward is nn.Embedding.forward


def _full_copy_wrapper(m: nn.Module) -> bool:
    """peft's ``modules_to_save`` wrapper: it runs the original table or a full trainable
    copy, and attribute reads (``weight``, ``sparse``) reach the one it runs."""
    orig, copies = getattr(m, "original_module", None), getattr(m, "modules_to_save", None)
    return (isinstance(orig, nn.Module) and isinstance(copies, nn.ModuleDict)
            and _is_embedding(orig) and all(_is_embedding(c) for c in copies.values()))


def check_expert_tables(layer: nn.Module) -> None:
    """ValueError unless ``layer.up_embed`` and ``layer.down_embed`` are tables whose
    ``weight`` is what the layer should use.

    The expert kernels read the tables' weights; they never call the modules.  A module
    wrapped around a table (peft LoRA, any adapter with its own forward) would be
    bypassed without a word, so it is refused.  Called at the start of the forward."""
    for name in ("up_embed", "down_embed"):
        m = getattr(layer, name)
        if _is_embedding(m) or _full_copy_wrapper(m):
            continue
        kind = f"{type(m).__module__}.{type(m).__qualname__}"
        raise ValueError(
            f"{name} is a {kind}, not an nn.Embedding: OmniMoE reads the expert tables "
            "up_embed and down_embed directly in its kernels, so an adapter on them (e.g. peft "
            "LoRA) would be ignored; train the tables fully (peft: modules_to_save=['up_embed', "
            "'down_embed']) or put the adapters on gate_proj, up_proj, down_proj, "
            "router_gate_x, router_gate_y and the attention projections")
