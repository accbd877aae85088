"""Small helpers shared by the Triton kernels."""

from __future__ import annotations

import triton
import triton.language as tl

from ._dispatch import interpret_mode

# Triton's interpreter truncates float32 -> bfloat16 instead of rounding to nearest even
# (its "rtne" mode does not carry either), so under TRITON_INTERPRET=1 the kernels round
# in integer arithmetic; compiled kernels use the hardware conversion, which is RNE.
SOFT_BF16: tl.constexpr = tl.constexpr(interpret_mode())


@triton.jit
def _bf16_rne(v):
    # Integer arithmetic throughout: some interpreters cannot build bf16 constants.
    bits = v.to(tl.int32, bitcast=True)
    out = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    # A NaN keeps its sign and becomes quiet (rounding could carry it into inf).
    out = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, (bits >> 16) | 0x40, out)
    return out.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_f32(v):
    """Exact float32 of float ``v``, also when interpreted.

    The interpreter keeps bfloat16 as raw 16-bit words and its conversion flushes or
    misplaces subnormals; widening the word is exact for every bit pattern.  Compiled
    kernels keep the hardware conversion.
    """
    if SOFT_BF16 and v.dtype == tl.bfloat16:
        return (v.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def loop_bound(v):
    """Runtime scalar ``v`` as a ``range`` bound.

    Compiled: ``v``.  Interpreted: a Python int, because older interpreters (Triton 3.6)
    convert a bound with int() of a one-element array, which NumPy >= 2.4 rejects.
    """
    if SOFT_BF16:
        return v.handle.data.item()
    else:
        return v


@triton.jit
def to_dtype(v, dtype: tl.constexpr):
    """Cast float32 ``v`` to ``dtype`` with round-to-nearest-even, also when interpreted."""
    if SOFT_BF16 and dtype == tl.bfloat16:
        return _bf16_rne(v)
    else:
        return v.to(dtype)


# ---------------------------------------------------------------------------------------
# Order-preserving integer keys and a bitonic top-k (used by the pruned router).
#
# Keys are int32 whose signed order is the router's total order on values: NaN below
# -inf, everything else as float comparison (with -0.0 just below +0.0, which the
# contract allows: equal values may come in any order).
# ---------------------------------------------------------------------------------------

KEY_NONE: tl.constexpr = tl.constexpr(-(2**31))  # below every real key: padding
KEY_NAN: tl.constexpr = tl.constexpr(-(2**31) + 1)  # a float32 NaN


@triton.jit
def f32_key(v):
    """float32 -> int32 key with the same order; every NaN -> KEY_NAN (below -inf)."""
    b = v.to(tl.int32, bitcast=True)
    # Negative floats order backwards in their bits: flip the magnitude bits.
    o = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
    return tl.where(v != v, KEY_NAN, o)


@triton.jit
def f32_from_key(k):
    """Inverse of ``f32_key`` (KEY_NAN decodes to a NaN)."""
    b = tl.where(k >= 0, k, k ^ 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def half_key(v, idx):
    """16-bit float ``v`` at column ``idx`` (0 <= idx < 2^16) -> one distinct int32 key.

    High half: the value's ordered 16 bits (NaN -> -2^15, below -inf); low half:
    0xFFFF - idx, so equal values rank the lower column first.  Every key of a row is
    distinct, and every real key is above KEY_NONE (that would be a NaN at column 0xFFFF).
    """
    b = v.to(tl.int16, bitcast=True).to(tl.int32)
    o = b ^ ((b >> 15) & 0x7FFF)  # arithmetic shift: flips magnitude bits of negatives
    if not SOFT_BF16:
        o = tl.where(v != v, -32768, o)
    elif v.dtype == tl.bfloat16:
        # Interpreted, bfloat16 compares as its raw word: NaN from the bits instead.
        o = tl.where((b & 0x7FFF) > 0x7F80, -32768, o)
    else:
        o = tl.where((b & 0x7FFF) > 0x7C00, -32768, o)
    return o * 65536 + (65535 - idx)


@triton.jit
def half_from_key(k, dtype: tl.constexpr):
    """Inverse of ``half_key``: (float32 value, int32 column)."""
    o = k >> 16
    b = tl.where(o >= 0, o, o ^ 0x7FFF)
    v = to_f32(b.to(tl.int16).to(dtype, bitcast=True))
    return v, 65535 - (k & 0xFFFF)


@triton.jit
def _pair_side(ND: tl.constexpr, ax: tl.constexpr):
    # 0 for the lower, 1 for the upper element of each pair along axis `ax` (rank ND).
    return tl.reshape(tl.arange(0, 2), [1] * ax + [2] + [1] * (ND - 1 - ax))


@triton.jit
def _partner(h, ax: tl.constexpr):
    # The other element of each pair along size-2 axis `ax`.  Compiled: an xor reduction,
    # which folds to a register move or one shuffle.  Interpreted: a (wrapping) sum,
    # because the interpreter runs xor reductions element by element in Python.
    if h.dtype.is_floating():
        b = h.to(tl.int32, bitcast=True)
        return _partner_int(b, ax).to(h.dtype, bitcast=True)
    else:
        return _partner_int(h, ax)


@triton.jit
def _partner_int(h, ax: tl.constexpr):
    if SOFT_BF16:
        return tl.sum(h, ax, keep_dims=True) - h
    else:
        return h ^ tl.xor_sum(h, ax, keep_dims=True)


@triton.jit
def _cas(h, p, ax: tl.constexpr, desc, HAS_P: tl.constexpr, DISTINCT: tl.constexpr):
    # One compare-exchange step between partners along size-2 axis `ax`.  `desc`
    # (broadcastable 0/1) says whether the enclosing block is sorted descending.
    # _pair_side and _partner are written out for integer tensors: the interpreter pays
    # milliseconds per nested jit call, and sorting networks make thousands of these.
    ND: tl.constexpr = len(h.shape)
    upper = tl.reshape(tl.arange(0, 2), [1] * ax + [2] + [1] * (ND - 1 - ax))
    if h.dtype.is_floating():
        ph = _partner(h, ax)
    elif SOFT_BF16:
        ph = tl.sum(h, ax, keep_dims=True) - h
    else:
        ph = h ^ tl.xor_sum(h, ax, keep_dims=True)
    want_max = (upper ^ desc) != 0
    if DISTINCT:
        # No ties: one compare decides for both partners.
        take = (ph > h) == want_max
    else:
        # Strict on both sides, so equal keys never both move (payloads stay distinct).
        take = tl.where(want_max, ph > h, ph < h)
    h = tl.where(take, ph, h)
    if HAS_P:
        if p.dtype.is_floating():
            pp = _partner(p, ax)
        elif SOFT_BF16:
            pp = tl.sum(p, ax, keep_dims=True) - p
        else:
            pp = p ^ tl.xor_sum(p, ax, keep_dims=True)
        p = tl.where(take, pp, p)
    return h, p


@triton.jit
def _kv_max(k1, p1, k2, p2):
    take = k2 > k1
    return tl.where(take, k2, k1), tl.where(take, p2, p1)


@triton.jit
def bitonic_topk(keys, payload, LB: tl.constexpr, KB: tl.constexpr, HAS_P: tl.constexpr,
                 DISTINCT: tl.constexpr = False):
    """Top-K of the last axis of a [R, L] integer tensor, sorted descending.

    L = 2^LB and K = 2^KB (KB <= LB) are passed as their logarithms.  With HAS_P, ``payload`` (same shape) travels
    with its key; otherwise pass any tensor and ignore the second result.  Equal keys
    come out in an unspecified (but fixed) order with their own payloads.  DISTINCT
    promises that no two keys of a row are equal (one compare per exchange instead of
    two).

    Bitonic network on the hypercube view [R, 2, ..., 2]: sort blocks of K alternately
    descending/ascending (log K (log K + 1) / 2 compare-exchange steps), then log(L/K)
    rounds of (element-wise max of adjacent blocks, which keeps the top K of both as a
    bitonic sequence; log K merge steps).  No loops over K, so compile time is small.
    """
    R: tl.constexpr = keys.shape[0]
    h = tl.reshape(keys, [R] + [2] * LB)
    p = tl.reshape(payload, [R] + [2] * LB) if HAS_P else h
    # Phase 1: blocks of 2, 4, ..., K; block direction from the bit above the block.
    for s in tl.static_range(1, KB + 1):
        if s == LB:
            desc = 1
        else:
            desc = 1 - _pair_side(LB + 1, LB - s)
        for i in tl.static_range(s):
            h, p = _cas(h, p, LB - (s - 1 - i), desc, HAS_P, DISTINCT)
    # Phase 2: halve until K remain; before round r the row has LB - r bits.
    for r in tl.static_range(LB - KB):
        if HAS_P:
            if SOFT_BF16:
                # The interpreter runs tuple reductions element by element in Python.
                ax: tl.constexpr = LB - r - KB
                upper = _pair_side(LB - r + 1, ax)
                ph = _partner(h, ax)
                lose = tl.where(upper == 0, ph > h, ph >= h)  # ties go to the lower one
                p = tl.sum(tl.where(lose, 0, p), ax)
                h = tl.max(h, axis=ax)
            else:
                h, p = tl.reduce((h, p), LB - r - KB, _kv_max)
        else:
            h = tl.max(h, axis=LB - r - KB)
            p = h
        if LB - r - 1 == KB:
            desc2 = 1
        else:
            desc2 = 1 - _pair_side(LB - r, LB - r - 1 - KB)
        for i in tl.static_range(KB):
            h, p = _cas(h, p, LB - r - 1 - (KB - 1 - i), desc2, HAS_P, DISTINCT)
    h = tl.reshape(h, [R, 2**KB])
    p = tl.reshape(p, [R, 2**KB])
    return h, p
