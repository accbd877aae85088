"""Reference atomic-expert op in plain PyTorch: the test oracle.

``expert_naive`` writes the formula (``cpu.py`` states it with its gradients)

    out[t] = sum_r act(u[idx[t,r]] . h[t]) * w[t,r] * v[idx[t,r]]

the way a PyTorch user would, differentiable through autograd, computed entirely in the
inputs' dtype (every op rounds).  On float64 copies it is the test oracle; on bf16/fp16
inputs it is the "naive" baseline the kernels' low-precision error is compared with (and
the timing baseline).

``expert_forward_reference`` / ``expert_backward_reference``, the library's PyTorch
path, live in ``cpu.py``; they are re-exported here for code that imports them from
this module.
"""

from __future__ import annotations

import torch

from .._activations import activation
from .cpu import expert_backward_reference, expert_forward_reference

__all__ = ["expert_naive", "expert_naive_rows", "expert_forward_reference", "expert_backward_reference"]


def expert_naive(hidden_states, up_weights, down_weights, routing_weights, indices, act="silu"):
    """The formula in autograd-visible PyTorch, every op in the inputs' (common) dtype.

    Differentiable in all four float inputs.  All float inputs must share one dtype.
    """
    idx = indices.long()
    return expert_naive_rows(hidden_states, up_weights[idx], down_weights[idx], routing_weights, act)


def expert_naive_rows(hidden_states, up_rows, down_rows, routing_weights, act="silu"):
    """``expert_naive`` after the gathers: up_rows, down_rows (T, k, H) are u[idx], v[idx]
    (the layer's oracle casts them between the gather and the math)."""
    a = torch.matmul(up_rows, hidden_states.unsqueeze(-1)).squeeze(-1)  # (T, k)
    z = activation(a, act) * routing_weights
    return torch.matmul(z.unsqueeze(1), down_rows).squeeze(1)           # (T, H)
