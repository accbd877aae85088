"""Router losses and expert-usage statistics for the factorised (N x N) omni router.

``router_aux_loss`` and ``expert_usage`` read the router logits a model returns with
``output_router_logits=True``: per OmniMoE layer a (T, 2N) float32 tensor
``[log p_x | log p_y]`` over the T tokens of the call (batch-major, i.e. token b*S + s).
``router_z_loss`` reads the logits before the log_softmax, ``[l_x | l_y]`` with
l_a = norm(W_a h), in the same layout: the log-probabilities' logsumexp is 0, so the
z-loss cannot be computed from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops._checks import check_int
from ..ops.router.op import omni_router


def _layer_shape(t) -> tuple[int, int]:
    """(T, N) of one layer's (T, 2N) router tensor; TypeError/ValueError otherwise."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"router_logits must hold tensors, got {type(t).__name__}")
    if t.dim() != 2 or t.shape[1] % 2:
        raise ValueError(f"router_logits must hold (T, 2N) tensors, got {tuple(t.shape)}")
    return t.shape[0], t.shape[1] // 2


def _token_mask(attention_mask, T: int, device):
    """(T,) float mask of real tokens, or None when the mask does not describe these T
    tokens (no mask, or a decode step whose mask also covers cached positions)."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.numel() != T:
        return None
    return attention_mask.reshape(T).to(device=device, dtype=torch.float32)


def router_aux_loss(router_logits, top_k: int, attention_mask: torch.Tensor | None = None):
    """Per-axis Switch-style load-balancing loss, averaged over axes and layers.

    The omni router picks its k experts among the per-axis top-k' candidates, k' =
    min(k, N) (the grid (i, j) it searches only contains rows and columns in those
    lists).  For each axis a in {x, y}:

        f_a[i] = share of (token, candidate) slots whose axis-a candidate is i  (no grad)
        P_a[i] = mean over tokens of p_a(i)                                       (grad)
        loss_a = N * sum_i f_a[i] * P_a[i]

    which is 1 for uniform routing and grows as tokens pile onto a few rows/columns;
    since expert i*N + j is used only when row i and column j are both candidates,
    spreading the two marginals spreads the N^2 experts.  ``attention_mask`` (B, S)
    excludes padding tokens when it matches the tokens of the call.  Returns a float32
    scalar (0 for no layers).
    """
    if isinstance(router_logits, torch.Tensor):
        router_logits = (router_logits,)
    top_k = check_int("top_k", top_k, 1)
    total, count = None, 0
    for lp in router_logits:
        T, n = _layer_shape(lp)
        mask = _token_mask(attention_mask, T, lp.device)
        weight = torch.ones(T, device=lp.device) if mask is None else mask
        denom = weight.sum().clamp_min(1.0)
        kk = min(top_k, n)
        layer_loss = lp.new_zeros(())
        for ax in (lp[:, :n], lp[:, n:]):
            ax = ax.float()
            cand = ax.topk(kk, dim=-1).indices
            hits = torch.zeros_like(ax).scatter_(1, cand, 1.0)
            f = (hits * weight[:, None]).sum(0) / (denom * kk)
            p = (ax.exp() * weight[:, None]).sum(0) / denom
            layer_loss = layer_loss + n * (f.detach() * p).sum()
        total = layer_loss / 2 if total is None else total + layer_loss / 2
        count += 1
    if count == 0:
        return torch.zeros(())
    return total / count


def router_z_loss(router_logits, attention_mask: torch.Tensor | None = None):
    """Router z-loss (ST-MoE) of the omni router, per axis, averaged over axes and layers.

    ``router_logits``: per OmniMoE layer a (T, 2N) tensor ``[l_x | l_y]`` of the router's
    normalised logits before the log_softmax, l_a = norm(W_a h) (what the models record
    as ``normalized_router_logits`` when ``router_z_loss_coef`` > 0; not the
    log-probabilities of ``output_router_logits``).  For each axis a in {x, y}:

        z_a = mean over tokens t of logsumexp_i(l_a[t, i])^2

    and the loss is (z_x + z_y) / 2, averaged over layers: the scale of one softmax
    router's z-loss, whatever the number of layers.  It pulls the logits' log-partition
    towards 0, keeping them small (numerically safe in low precision); through the norm,
    its gradient reaches the router gates.  ``attention_mask`` (B, S) excludes padding
    tokens when it matches the tokens of the call, as in ``router_aux_loss``.  Returns a
    float32 scalar (0 for no layers or no tokens).
    """
    if isinstance(router_logits, torch.Tensor):
        router_logits = (router_logits,)
    layers = []
    for lg in router_logits:
        T, n = _layer_shape(lg)
        mask = _token_mask(attention_mask, T, lg.device)
        weight = torch.ones(T, device=lg.device) if mask is None else mask
        lse = torch.logsumexp(lg.float().reshape(T, 2, n), dim=-1)       # (T, 2)
        layers.append((lse.square().sum(1) * weight).sum() / (2 * weight.sum().clamp_min(1.0)))
    return torch.stack(layers).mean() if layers else torch.zeros(())


@dataclass
class ExpertUsage:
    """Which experts a batch used, per OmniMoE layer.

    counts[l]: (E,) int64, how many (token, slot) assignments went to each expert.
    touched[l]: how many of the E experts received at least one token.
    """

    num_experts: int
    counts: list
    touched: list

    @property
    def fraction_touched(self) -> list:
        return [t / self.num_experts for t in self.touched]


@torch.no_grad()
def expert_usage(router_logits, top_k: int, attention_mask: torch.Tensor | None = None) -> ExpertUsage:
    """Recompute each layer's routing from its router log-probabilities (the omni router
    is deterministic, so these are the experts the forward used) and count them.
    Padding tokens (``attention_mask`` == 0, when it matches the tokens) are skipped."""
    if isinstance(router_logits, torch.Tensor):
        router_logits = (router_logits,)
    top_k = check_int("top_k", top_k, 1)
    counts, touched, E = [], [], None
    for lp in router_logits:
        T, n = _layer_shape(lp)
        E = n * n
        if top_k > E:
            raise ValueError(f"top_k must be in [1, {E}] (the layer's N*N experts), got {top_k}")
        _, idx = omni_router(lp[:, :n].float().contiguous(), lp[:, n:].float().contiguous(), n, top_k)
        mask = _token_mask(attention_mask, T, lp.device)
        idx = idx.long()
        if mask is not None:
            idx = idx[mask.bool()]
        c = torch.bincount(idx.reshape(-1), minlength=E)
        counts.append(c)
        touched.append(int((c > 0).sum()))
    return ExpertUsage(num_experts=E if E is not None else 0, counts=counts, touched=touched)


__all__ = ["router_aux_loss", "router_z_loss", "expert_usage", "ExpertUsage"]
