"""Plain-PyTorch reference of the whole OmniMoE layer, token-centric, any float dtype.

This is the test oracle (run in float64) and the "PyTorch reference" the layer benchmark
compares against (run in the benchmark's dtype).  It composes the ops' oracles
(``ops/*/reference.py``) into the formula of docs/layer.md:

    lx = norm(W_x h), ly = norm(W_y h);  px = log_softmax(lx), py = log_softmax(ly)
    scores, idx = top-k over (i, j) of px[i] + py[j]
    experts = sum_r act(u[idx_r] . h) * exp(scores_r) * v[idx_r]     (gathers (T, k, H))
    out = W_down (act(W_gate h) * W_up h) + experts

every step in the parameters' dtype (no float32 islands), so in bf16 it is the "naive"
formula.  The routing can be forced (``indices=...``): tests compare two runs on the
same experts when rounding alone would flip near-tied choices.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.expert.reference import expert_naive_rows
from ..ops.router.reference import product_key_topk
from ..ops.swiglu.reference import swiglu_naive


def expert_reference(hidden_states, up_weights, down_weights, routing_weights, indices,
                     act: str = "silu", compute_dtype: torch.dtype | None = None):
    """Token-centric atomic experts: out[t] = sum_r act(u[e]·h[t]) * w[t,r] * v[e], e = idx[t,r].

    The op's oracle (``expert_naive_rows``) on the gathered (T, k, H) rows, with w cast to
    h's dtype.  ``compute_dtype`` (e.g. float32 or float64) upcasts the gathered rows, h
    and w first; the result is in that dtype (default: hidden_states' dtype, math in it).
    Differentiable in all four float inputs.
    """
    idx = indices.long()
    u, v, h = up_weights[idx], down_weights[idx], hidden_states
    if compute_dtype is not None:
        u, v, h = u.to(compute_dtype), v.to(compute_dtype), h.to(compute_dtype)
    return expert_naive_rows(h, u, v, routing_weights.to(h.dtype), act)


def route_reference(px: torch.Tensor, py: torch.Tensor, k: int, indices: torch.Tensor | None = None):
    """Top-k of px[:, i] + py[:, j] over the N x N grid, in px's dtype.

    Exact through per-axis top-k' (k' = min(k, N)) and the k' x k' grid (see
    docs/router.md; the router op's ``product_key_topk``); only the choice among exactly
    equal sums is arbitrary.  With ``indices`` given, returns the sums at those indices
    instead (same routing as another run).  Differentiable in px and py.
    """
    if indices is not None:
        T, N = px.shape
        idx = indices.long().reshape(T, -1)
        return px.gather(1, idx // N) + py.gather(1, idx % N), idx
    return product_key_topk(px, py, k)


class OmniMoEReference(nn.Module):
    """Token-centric PyTorch twin of ``omni_moe.OmniMoE`` with the same state_dict keys.

    Build it from a config, or copy a layer with ``from_module(layer, dtype)``; cast it
    with ``.double()`` for a float64 oracle.  Its router norms are plain
    ``nn.BatchNorm1d(affine=False)`` whose statistics live in the module's dtype.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        H, I, E = config.hidden_size, config.intermediate_size, config.num_experts
        N = config.num_expert_sqrt
        self.num_expert_sqrt = N
        self.top_k = config.num_experts_per_token
        self.act = config.hidden_act
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.router_gate_x = nn.Linear(H, N, bias=False)
        self.router_gate_y = nn.Linear(H, N, bias=False)
        if config.router_norm == "batchnorm":
            self.router_norm_x = nn.BatchNorm1d(N, affine=False)
            self.router_norm_y = nn.BatchNorm1d(N, affine=False)
        elif config.router_norm == "layernorm":
            self.router_norm_x = nn.LayerNorm(N, elementwise_affine=False)
            self.router_norm_y = nn.LayerNorm(N, elementwise_affine=False)
        else:
            self.router_norm_x = nn.Identity()
            self.router_norm_y = nn.Identity()
        self.up_embed = nn.Embedding(E, H)
        self.down_embed = nn.Embedding(E, H)

    @classmethod
    def from_module(cls, module: nn.Module, dtype: torch.dtype = torch.float64) -> "OmniMoEReference":
        """A reference with ``module``'s parameters and buffers, cast to ``dtype``, in
        ``module``'s train/eval mode."""
        ref = cls(module.config)
        ref.load_state_dict(module.state_dict())
        p = next(module.parameters())
        ref = ref.to(device=p.device, dtype=dtype)
        ref.train(module.training)
        return ref

    def forward(self, hidden_states: torch.Tensor, indices: torch.Tensor | None = None,
                return_routing: bool = False):
        """(..., H) -> (..., H) in the module's dtype.  ``indices`` (..., k) forces the
        routing; ``return_routing=True`` also returns (scores, indices), shaped (..., k)."""
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])
        lx = self.router_norm_x(self.router_gate_x(h))
        ly = self.router_norm_y(self.router_gate_y(h))
        px = F.log_softmax(lx, dim=-1)
        py = F.log_softmax(ly, dim=-1)
        scores, idx = route_reference(px, py, self.top_k, indices)
        experts = expert_reference(h, self.up_embed.weight, self.down_embed.weight,
                                   scores.exp(), idx, self.act)
        mlp = self.down_proj(swiglu_naive(self.gate_proj(h), self.up_proj(h), self.act))
        out = (mlp + experts).reshape(shape)
        if return_routing:
            lead = shape[:-1]
            return out, (scores.reshape(*lead, -1), idx.reshape(*lead, -1))
        return out
