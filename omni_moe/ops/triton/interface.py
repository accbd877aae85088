"""``omni_moe.ops.triton.interface``, the module through which the newest public upstream
package (github.com/HKUSTDial/omni-moe, formerly flash-algo/omni-moe) exports its three
functions; ``omni_moe.ops.triton`` re-exports them.  Thin adapters over this package's
public functions with upstream's names, parameter order and defaults
(docs/compatibility.md).
"""

from __future__ import annotations

from ..expert.op import omni_expert
# The router and the MLP kept their parameters when upstream moved them into this module,
# so the per-file adapters serve both paths.
from .omni_mlp import triton_omni_mlp_func
from .omni_router import triton_omni_router_func

__all__ = ["triton_omni_mlp_func", "triton_omni_router_func", "triton_omni_expert_func"]


def triton_omni_expert_func(x, up_weight, down_weight, routing_weights, indices):
    """out[t] = sum_r silu(up_weight[e] . x[t]) * routing_weights[t, r] * down_weight[e],
    e = indices[t, r]: ``omni_moe.omni_expert(..., act="silu")``.

    The same function as ``omni_moe.ops.triton.omni_expert.triton_omni_expert_func`` under
    the parameter names upstream gave it here (``x``, ``up_weight``, ``down_weight``), so
    keyword calls written for either path work.

    Args:
        x: (T, H); up_weight, down_weight: (E, H) (``nn.Embedding`` weights);
        routing_weights: (T, k) float multipliers; indices: (T, k) int32/int64 in [0, E).

    Returns (T, H) in x's dtype.  Differentiable in the four float inputs.
    """
    return omni_expert(x, up_weight, down_weight, routing_weights, indices, act="silu")
