"""``triton_omni_router_func`` at the public flash-algo/omni-moe import path.

It runs ``omni_moe.omni_router``, the fastest exact router (the pruned algorithm), so code
written for that package gets this package's speed unchanged.  The original full scan
stays at ``omni_moe.triton.omni_router.triton_omni_router_func``.
"""

from __future__ import annotations

from ..router.op import omni_router

__all__ = ["triton_omni_router_func"]


def triton_omni_router_func(router_logits_x, router_logits_y, num_expert_sqrt, num_experts_per_token):
    """Top-k experts of the N x N product grid: ``omni_moe.omni_router``.

    Args:
        router_logits_x, router_logits_y: (T, N) float32/float16/bfloat16 (in
            flash-algo/omni-moe's ``OmniMoE``: per-axis log-probabilities).
        num_expert_sqrt: N.
        num_experts_per_token: k, 0 <= k <= N*N (any k, odd included).

    Returns:
        (scores, indices): (T, k) in the input dtype, sorted descending, and (T, k) int32
        flat indices i*N + j.  Differentiable in both logits through ``scores``.
    """
    return omni_router(router_logits_x, router_logits_y, num_expert_sqrt, num_experts_per_token)
