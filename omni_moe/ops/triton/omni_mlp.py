"""``triton_omni_mlp_func`` at the public flash-algo/omni-moe import path: the shared
SwiGLU MLP, ``omni_moe.ops.swiglu_mlp`` with ``act="silu"``."""

from __future__ import annotations

from ..swiglu.op import swiglu_mlp

__all__ = ["triton_omni_mlp_func"]


def triton_omni_mlp_func(x, gate_weight, up_weight, down_weight):
    """``(silu(x @ gate_weight.T) * (x @ up_weight.T)) @ down_weight.T``.

    Args:
        x: (T, H) (any leading dimensions are accepted: (..., H));
        gate_weight, up_weight: (I, H); down_weight: (H, I) (``nn.Linear`` layout).

    Returns (..., H) in x's dtype.  Differentiable in all four inputs.
    """
    return swiglu_mlp(x, gate_weight, up_weight, down_weight, "silu")
