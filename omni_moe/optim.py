"""Optimizer helpers for models with OmniMoE layers.

``param_groups``: the expert tables (``up_embed`` / ``down_embed`` of every ``OmniMoE``)
in a group of their own, with their own learning rate and no weight decay by default.
Each table row is one expert's vector, updated only on the steps that route to it
(every ~E / (T k) steps for a rarely used one); product-key memories train such value
tables with a higher learning rate than the dense weights and without weight decay,
which would shrink a row on every step while its gradient arrives rarely.

``clip_grad_norm_``: ``torch.nn.utils.clip_grad_norm_`` for gradients of either layout
(dense or sparse COO, as ``sparse_expert_grad=True`` produces).

``RowSGD`` / ``RowAdam``: SGD and ``torch.optim.SparseAdam``'s lazy Adam for tables with
sparse row gradients, applied by one row-update kernel per table (``omni_moe.ops.
row_update``): each used row read and written once, where torch adds a sparse gradient
into a dense table with an atomic ``index_add_``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .ops._checks import check_betas, check_float
from .ops.row_update import row_update


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The expert tables (``up_embed.weight``, ``down_embed.weight``) of every ``OmniMoE``
    in ``model`` (the model itself included), each once, in module order."""
    from .layers.omni_moe import OmniMoE

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, OmniMoE):
            for p in (m.up_embed.weight, m.down_embed.weight):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def param_groups(model: nn.Module, *, lr: float, expert_lr: float | None = None,
                 weight_decay: float = 0.0, expert_weight_decay: float = 0.0,
                 split: bool = False):
    """Parameter groups for ``torch.optim`` optimizers: the expert tables apart.

    Args:
        model: any module containing ``OmniMoE`` layers.
        lr, weight_decay: of every other trainable parameter (the default group).
        expert_lr: learning rate of the expert tables (default: ``lr``).
        expert_weight_decay: their weight decay (default 0).
        split: False (default): returns ``[default_group, expert_group]`` for one
            optimizer, e.g. ``torch.optim.AdamW(param_groups(model, lr=1e-3,
            expert_lr=1e-2, weight_decay=0.1))``.  True: returns the two groups as a
            tuple ``(default_group, expert_group)`` for two optimizers -- what sparse
            expert gradients need (``torch.optim.SparseAdam([expert_group])`` and a
            dense optimizer for the rest).

    Groups are dicts with ``params``, ``lr``, ``weight_decay`` and ``name`` ("default" /
    "experts"); a group may be empty (a model without OmniMoE layers has no expert
    parameters).  Only parameters with ``requires_grad`` are included, each once.
    For SparseAdam, drop ``weight_decay`` from the expert group (it has no such option).
    """
    check_float("lr", lr, 0.0)
    if expert_lr is None:
        expert_lr = lr
    check_float("expert_lr", expert_lr, 0.0)
    check_float("weight_decay", weight_decay, 0.0)
    check_float("expert_weight_decay", expert_weight_decay, 0.0)
    experts = [p for p in expert_parameters(model) if p.requires_grad]
    ids = {id(p) for p in experts}
    seen, rest = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in ids and id(p) not in seen:
            seen.add(id(p))
            rest.append(p)
    default = {"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "default"}
    expert = {"params": experts, "lr": expert_lr, "weight_decay": expert_weight_decay,
              "name": "experts"}
    return (default, expert) if split else [default, expert]


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scale the gradients of ``parameters`` in place so that their joint ``norm_type``
    norm is at most ``max_norm``; returns the norm before clipping (a 0-d tensor).

    As ``torch.nn.utils.clip_grad_norm_`` (same formula: coefficient max_norm / (norm +
    1e-6), clamped to 1), but sparse COO gradients are accepted: their norm is that of
    their coalesced values.  No host sync (the clamp is a tensor op).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    check_float("max_norm", max_norm, 0.0)
    if check_float("norm_type", norm_type) <= 0:
        raise ValueError(f"norm_type must be a positive number or inf, got {norm_type!r}")
    if not grads:
        return torch.tensor(0.0)
    dev = grads[0].device
    # A sparse gradient's values may repeat rows (accumulated passes): coalesce first.
    dense_views = [g.coalesce().values() if g.is_sparse else g for g in grads]
    norms = torch.stack([torch.linalg.vector_norm(v.detach(), norm_type, dtype=torch.float32).to(dev)
                         for v in dense_views])
    total = torch.linalg.vector_norm(norms, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        if g.is_sparse:
            # In place on the stored tensor: its values are scaled (duplicates included).
            g._values().mul_(coef.to(g.dtype))
        else:
            g.mul_(coef.to(g.dtype))
    return total


def _sparse_rows(p: torch.Tensor, who: str):
    """(rows, values) of ``p.grad``, coalesced (distinct rows, duplicates summed)."""
    g = p.grad
    if not g.is_sparse:
        raise TypeError(f"{who} takes sparse gradients (sparse_expert_grad=True); got a dense "
                        f"gradient for a {tuple(p.shape)} parameter: use torch.optim.SGD / Adam for it")
    if p.dim() != 2 or g.sparse_dim() != 1:
        raise ValueError(f"{who} updates (R, H) tables with row-sparse gradients, got a "
                         f"{tuple(p.shape)} parameter with sparse_dim {g.sparse_dim()}")
    g = g.coalesce()
    return g.indices()[0], g.values()


class _RowOptimizer(torch.optim.Optimizer):
    # The step loop shared by RowSGD and RowAdam: each table's coalesced sparse gradient
    # goes to ``_update``.
    _name = ""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, *_sparse_rows(p, self._name), group)
        return loss


class RowSGD(_RowOptimizer):
    """Plain SGD (no momentum, no weight decay) for tables with sparse row gradients:
    ``p[i] -= lr * g[i]`` on the gradient's rows only, one kernel per table."""

    _name = "RowSGD"

    def __init__(self, params, lr: float = 1e-3):
        check_float("lr", lr, 0.0)
        super().__init__(params, dict(lr=lr))

    def _update(self, p, rows, values, group):
        row_update(p, values, rows, lr=group["lr"])


class RowAdam(_RowOptimizer):
    """``torch.optim.SparseAdam``'s lazy Adam for tables with sparse row gradients: the
    moments of a row, and the row, move only on steps whose gradient holds it; the step
    count (bias correction) is the table's.  One kernel per table updates the D rows of
    the parameter and both moments in float32 and rounds once into each tensor's dtype
    (the moments have the parameter's dtype, as SparseAdam's).  No weight decay (see
    docs/layer.md)."""

    _name = "RowAdam"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        check_float("lr", lr, 0.0)
        betas = check_betas(betas)
        check_float("eps", eps, 0.0)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    def _update(self, p, rows, values, group):
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        state["step"] += 1
        row_update(p, values, rows, lr=group["lr"], exp_avg=state["exp_avg"],
                   exp_avg_sq=state["exp_avg_sq"], betas=group["betas"], eps=group["eps"],
                   step=state["step"])
