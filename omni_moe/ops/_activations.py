"""The activations the ops support, in one place: names, PyTorch forms, Triton forms.

Semantics are torch's: ``gelu`` is the exact erf form; ``relu(NaN) = NaN`` and
``relu'(x) = 0`` where ``x <= 0``, else 1 (NaN included), as ``threshold_backward``.
Kernels pass the activation as ``ACT = ACT_ID[name]`` (a ``tl.constexpr``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._checks import check_choice

ACTIVATIONS = ("silu", "gelu", "relu")
ACT_ID = {name: i for i, name in enumerate(ACTIVATIONS)}

_SQRT1_2 = 0.7071067811865476        # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327   # 1 / sqrt(2 pi)


def check_activation(act, name: str = "act") -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``act`` is a supported activation."""
    check_choice(name, act, ACTIVATIONS)


def activation(a: torch.Tensor, act: str) -> torch.Tensor:
    """act(a) with torch's own functions, in a's dtype."""
    if act == "silu":
        return F.silu(a)
    if act == "gelu":
        return F.gelu(a)
    if act == "relu":
        return F.relu(a)
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def activation_and_grad(a: torch.Tensor, act: str):
    """(act(a), act'(a)) elementwise, in a's dtype."""
    if act == "silu":
        s = torch.sigmoid(a)
        return a * s, s * (1.0 + a * (1.0 - s))
    if act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(a * _SQRT1_2))
        return a * cdf, cdf + a * torch.exp(-0.5 * a * a) * _INV_SQRT_2PI
    if act == "relu":
        return F.relu(a), (~(a <= 0)).to(a.dtype)
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


@triton.jit
def act_fwd(a, ACT: tl.constexpr):
    """act(a) of a float32 tensor."""
    if ACT == 0:
        z = a * tl.sigmoid(a)
    elif ACT == 1:
        z = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    else:
        z = tl.where(a < 0.0, 0.0, a)
    return z


@triton.jit
def act_fwd_bwd(a, ACT: tl.constexpr):
    """(act(a), act'(a)) of a float32 tensor."""
    if ACT == 0:
        s = tl.sigmoid(a)
        z = a * s
        dz = s * (1.0 + a * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        z = a * cdf
        dz = cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327
    else:
        z = tl.where(a < 0.0, 0.0, a)
        dz = tl.where(a <= 0.0, 0.0, 1.0)
    return z, dz
