"""The full-scan router at its first upstream path: ``triton_omni_router_func``.

The full scan of all N^2 pairs (``omni_moe.ops.router.fullscan``), kept as the baseline
the fast router is compared against; same contract, validation and backward as
``omni_moe.omni_router``.
"""

from ..ops.router.op import route


def triton_omni_router_func(router_logits_x, router_logits_y, num_expert_sqrt, num_experts_per_token):
    """The full-scan omni router: O(T * N^2 * k) work, same results as ``omni_router``."""
    return route(router_logits_x, router_logits_y, num_expert_sqrt, num_experts_per_token,
                 "fullscan")


__all__ = ["triton_omni_router_func"]
