"""Small helpers shared by the Triton kernels."""

from __future__ import annotations

import triton
import triton.language as tl

from .._dispatch import interpret_mode

# Triton's interpreter truncates float32 -> bfloat16 instead of rounding to nearest even
# (its "rtne" mode does not carry either), so under TRITON_INTERPRET=1 the kernels round
# in integer arithmetic; compiled kernels use the hardware conversion, which is RNE.
SOFT_BF16: tl.constexpr = tl.constexpr(interpret_mode())


@triton.jit
def _bf16_rne(v):
    bits = v.to(tl.int32, bitcast=True)
    bits = bits + (((bits >> 16) & 1) + 0x7FFF)
    out = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return tl.where(v != v, float("nan"), out)


@triton.jit
def to_dtype(v, dtype: tl.constexpr):
    """Cast float32 ``v`` to ``dtype`` with round-to-nearest-even, also when interpreted."""
    if SOFT_BF16 and dtype == tl.bfloat16:
        return _bf16_rne(v)
    else:
        return v.to(dtype)
