"""``triton_omni_expert_func`` at the public flash-algo/omni-moe import path.

Upstream's atomic experts are SiLU experts weighted by ``routing_weights`` (probabilities,
the exp of the router's log-probability scores, used as plain multipliers); this runs
``omni_moe.omni_expert`` with ``act="silu"``.
"""

from __future__ import annotations

from ..expert.op import omni_expert

__all__ = ["triton_omni_expert_func"]


def triton_omni_expert_func(hidden_states, up_weights, down_weights, routing_weights, indices):
    """out[t] = sum_r silu(up_weights[e] . hidden_states[t]) * routing_weights[t, r] *
    down_weights[e], e = indices[t, r].

    Args:
        hidden_states: (T, H); up_weights, down_weights: (E, H) (``nn.Embedding`` weights);
        routing_weights: (T, k) float multipliers; indices: (T, k) int32/int64 in [0, E).

    Returns (T, H) in hidden_states' dtype.  Differentiable in the four float inputs.
    """
    return omni_expert(hidden_states, up_weights, down_weights, routing_weights, indices, act="silu")
