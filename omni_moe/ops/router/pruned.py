"""The pruned omni router: exact top-k without forming the N x N grid, one launch per call.

For each token t the router returns the k largest of s[t, i*N + j] = x[t, i] + y[t, j]
(float32 sums, sorted descending, scores rounded to the input dtype, int32 indices).
It never forms the N x N grid.  Per token (k' = min(k, N)):

1. per axis, the k' largest logits, sorted, with their columns;
2. the top-k of the sums over the candidate pairs (a, b) of ranks a, b < k' with
   (a + 1) * (b + 1) <= k -- about k * ln k pairs instead of k'^2 -- because a pair
   at ranks (a, b) is beaten or tied by the (a + 1)(b + 1) - 1 pairs of smaller ranks
   on both axes, so it is never needed when that count reaches k.

Selection works on int32 keys whose signed order is the router's total order (NaN
below -inf; _triton.f32_key).  For 16-bit inputs one int32 holds the value's ordered 16
bits and the column (_triton.half_key): a sort moves one register per element and every
key of a row is distinct.  float32 inputs carry the column as a separate payload.  Grid
keys are the ordered float32 sum with the flat index as payload.

Two kernels (``default_config`` picks; docs/router.md has the measurements, the
exactness argument and the launch rules):

- ``_pruned_router_stream_kernel`` (k <= 16 <= next_pow2(N)): one to 32 threads per
  token stream the row in 16-column chunks (16-key bitonic sort, bitonic merge into a
  running sorted list), all in registers; the grid stage merges candidate blocks that
  are sorted by construction.
- ``_pruned_router_fwd_kernel`` (every fast-path shape): a token's row across a warp.
  Per axis either a bitonic top-k' of the padded row, or a threshold stage: the minimum
  of the maxima of k'' = next_pow2(k') column groups bounds the k'-th largest key from
  below, bisection in key space brings the survivors to at most M, which are compacted
  (prefix sum) into a per-program scratch row (L2-resident, reused by the persistent
  loop) and sorted at width M.  The grid stage fetches the pruned pairs' keys by rank
  (table (a << 16 | b) built on the host) through scratch or, without pruning, forms
  the k''^2 pairs in registers.

Bytes moved per call: reads 2*T*N*b logits (b = bytes per logit) once, writes
T*k*(b + 4) outputs; the warp kernel's scratch traffic (per token at most 2*(M + k'')
int32 words, 2x for float32) stays in L2.

``pruned_router_forward`` is the dispatcher of the ``"pruned"`` algorithm: these two
kernels for k < ``LARGE_K_MIN_K`` on the fast path, the large-k kernel (``large_k.py``)
past it while next_pow2(N) <= 4096, and beyond that (wider rows) a PyTorch algorithm on
the same device (``cpu.router_cpu``'s choice: O(T * (N + k)) memory).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._checks import check_int, check_pow2
from .._dispatch import device_info
from .._triton import (
    KEY_NONE,
    _cas,
    _pair_side,
    _partner,
    bitonic_topk,
    f32_from_key,
    f32_key,
    half_from_key,
    half_key,
    loop_bound,
    to_dtype,
)
from .cpu import router_cpu
from .large_k import LargeKConfig, large_k_router_forward
from .large_k import default_config as large_k_config
from .large_k import kernel_ok as large_k_ok

@triton.jit
def _keys_of(v, col, N, PACKED: tl.constexpr, EVEN_N: tl.constexpr):
    # Selection keys of loaded logits v at columns col; columns >= N (padding) get
    # KEY_NONE, below every real key.
    if PACKED:
        key = half_key(v, col)
    else:
        key = f32_key(v.to(tl.float32))
    if not EVEN_N:
        key = tl.where(col < N, key, KEY_NONE)
    return key


@triton.jit
def _axis_keys(P, rows64, row_ok, stride_t, stride_n, N, NP: tl.constexpr, PACKED: tl.constexpr,
               EVEN_N: tl.constexpr):
    # One [TILE_T, NP] tile of selection keys; padding columns and rows get KEY_NONE.
    cols = tl.arange(0, NP)
    if EVEN_N:
        # A mask constant along the row keeps the loads 16 bytes wide.
        ok = row_ok[:, None] & (cols[None, :] < NP)
    else:
        ok = row_ok[:, None] & (cols[None, :] < N)
    v = tl.load(P + rows64[:, None] * stride_t + cols.to(tl.int64)[None, :] * stride_n, mask=ok,
                other=0.0)
    # (Rows past T keep junk keys: their results are never stored.)
    return _keys_of(v, cols[None, :], N, PACKED, EVEN_N)


@triton.jit
def _lane_keys(P, rows64, row_ok, stride_t, stride_n, N, R: tl.constexpr, C: tl.constexpr,
               PACKED: tl.constexpr, EVEN_N: tl.constexpr):
    # [R, TILE_T, C] keys: element (j, t, l) is column l*R + j of token t.  Lane l owns
    # R consecutive columns (one 16-byte load for R*b = 16), tokens go to warps, and
    # every later [R, TILE_T, C] op -- including the data-dependent scatter -- keeps this
    # layout, so nothing is reshuffled through shared memory.  Also returns the columns.
    j = tl.arange(0, R)[:, None, None]
    l = tl.arange(0, C)[None, None, :]
    col = l * R + j
    if EVEN_N:
        ok = row_ok[None, :, None] & (col < R * C)
    else:
        ok = row_ok[None, :, None] & (col < N)
    v = tl.load(P + rows64[None, :, None] * stride_t + col.to(tl.int64) * stride_n, mask=ok,
                other=0.0)
    # Rows past T keep their (distinct) keys of 0.0: their results are never stored, but
    # their survivor count must stay <= M like any row's, since the scatter relies on it.
    return _keys_of(v, col, N, PACKED, EVEN_N), col


@triton.jit
def _count_ge3(key, thr):
    return tl.sum(tl.sum((key >= thr[None, :, None]).to(tl.int32), axis=0), axis=1)


@triton.jit
def _excl_prefix3(f):
    # Exclusive prefix count of the 0/1 tensor f ([R, TILE_T, C]) in (lane, register)
    # order: a sequential sum inside each thread, then one scan across the lanes.
    inner = tl.cumsum(f, axis=0) - f
    tot = tl.sum(f, axis=0)
    return (tl.cumsum(tot, axis=1) - tot)[None, :, :] + inner


@triton.jit
def _select_survivors(key, col, KX, SK, SP, KXP: tl.constexpr, M: tl.constexpr,
                      PACKED: tl.constexpr):
    # For each token of `key` ([R, TILE_T, C]) write between KX and M keys that include
    # its top KX to SK[t, 0:count] (+ their columns to SP); return count ([TILE_T]).
    # SK, SP: [1, TILE_T, 1] pointers to each token's scratch slots.
    R: tl.constexpr = key.shape[0]
    TILE_T: tl.constexpr = key.shape[1]
    C: tl.constexpr = key.shape[2]
    # KXP <= C groups, each holding at least one real column (see docs): their maxima
    # are KXP distinct keys, so the smallest one, lo, has count(key >= lo) >= KXP >= KX.
    lane_max = tl.max(key, axis=0)  # [TILE_T, C]
    # group g = lanes g, g + KXP, ...
    gmax = tl.max(tl.reshape(lane_max, [TILE_T, C // KXP, KXP]), axis=1)
    lo = tl.min(gmax, axis=1).to(tl.int64)
    hi = tl.max(gmax, axis=1).to(tl.int64) + 1  # count(key >= hi) = 0 < KX
    c_lo = _count_ge3(key, lo.to(tl.int32))
    # Bisect in key space.  Invariant: count(key >= lo) >= KX > count(key >= hi).
    active = (c_lo > M) & (hi - lo > 1)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        mid = (lo + hi) >> 1
        c_mid = _count_ge3(key, mid.to(tl.int32))
        up = active & (c_mid >= KX)
        lo = tl.where(up, mid, lo)
        c_lo = tl.where(up, c_mid, c_lo)
        hi = tl.where(active & (c_mid < KX), mid, hi)
        active = (c_lo > M) & (hi - lo > 1)
    lo3 = lo.to(tl.int32)[None, :, None]
    if PACKED:
        # Keys are distinct, so the loop ended with c_lo <= M (or hi = lo + 1, c_lo <= KX).
        surv = key >= lo3
    else:
        # float32 keys may tie at lo; then hi = lo + 1, fewer than KX keys are above lo,
        # and any of the tied ones may fill the slots left (they are equal values).
        gt = key > lo3
        c_gt = tl.sum(tl.sum(gt.to(tl.int32), axis=0), axis=1)
        eq = (key == lo3).to(tl.int32)
        surv = gt | ((eq != 0) & (_excl_prefix3(eq) < (M - c_gt)[None, :, None]))
    pos = _excl_prefix3(surv.to(tl.int32))
    tl.store(SK + pos, key, mask=surv)
    if not PACKED:
        tl.store(SP + pos, col, mask=surv)
    return tl.minimum(c_lo, M)


@triton.jit
def _decode(key, pay, DT: tl.constexpr, PACKED: tl.constexpr):
    # (float32 value, int32 column) of per-axis keys.
    if PACKED:
        v, col = half_from_key(key, DT)
    else:
        v = f32_from_key(key)
        col = pay
    return v, col


@triton.jit
def _pruned_router_fwd_kernel(
    X, Y, S, I, SCR, CAND,
    T, N, K, KX, num_tiles,
    stride_xt, stride_xn, stride_yt, stride_yn,
    stride_st, stride_sk, stride_it, stride_ik,
    TILE_T: tl.constexpr, LNP: tl.constexpr, LKX: tl.constexpr, LKO: tl.constexpr,
    LC: tl.constexpr, LM: tl.constexpr,
    AXIS_THRESH: tl.constexpr, GRID: tl.constexpr, PACKED: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """Exact top-K of x[t, i] + y[t, j] over all N^2 pairs, for every token t.

    Writes S[t, :K] (sorted descending, input dtype, RNE) and I[t, :K] (int32 i*N + j).
    Grid: (P,) persistent programs; program p handles token tiles p, p + P, ... of
    TILE_T tokens and owns scratch rows SCR[p*TILE_T*W : (p+1)*TILE_T*W] (W words per
    token, see the launcher).  NP = 2^LNP >= N, KXP = 2^LKX >= KX = min(K, N),
    KP = 2^LKO >= K, candidate width 2^LC, survivor slots M = 2^LM.  GRID: 0 = all
    k''^2 pairs in registers, 1 = pruned pairs fetched through scratch.
    Bytes: reads 2*T*N*b logits once, writes T*K*(b + 4); scratch stays in L2.
    """
    NP: tl.constexpr = 2**LNP
    KXP: tl.constexpr = 2**LKX
    KP: tl.constexpr = 2**LKO
    CP: tl.constexpr = 2**LC
    M: tl.constexpr = 2**LM
    NPAY: tl.constexpr = 1 if PACKED else 2
    SW: tl.constexpr = M * NPAY if AXIS_THRESH else 0
    LW: tl.constexpr = KXP * NPAY if GRID == 1 else 0
    W: tl.constexpr = 2 * SW + 2 * LW
    DT: tl.constexpr = X.dtype.element_ty

    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, TILE_T)
    scr_rows = (pid * TILE_T + lanes).to(tl.int64) * W
    scr = SCR + scr_rows[:, None]  # [TILE_T, 1]
    scr3 = SCR + scr_rows[None, :, None]  # [1, TILE_T, 1]
    cols = tl.arange(0, NP)
    cols2 = tl.broadcast_to(cols[None, :], [TILE_T, NP])
    ko = tl.arange(0, KP).to(tl.int64)  # int64: ko * stride can pass 2^31
    if GRID != 0:
        cand = tl.load(CAND + tl.arange(0, CP))
        cvalid = (cand >= 0)[None, :]
        cand = tl.where(cand >= 0, cand, 0)
        ca = (cand >> 16)[None, :]
        cb = (cand & 0xFFFF)[None, :]
    else:
        ga = tl.arange(0, KXP)[:, None]
        gb = tl.arange(0, KXP)[None, :]
        gvalid = (ga < KX) & (gb < KX) & ((ga + 1) * (gb + 1) <= K)
        gvalid = tl.reshape(tl.broadcast_to(gvalid[None, :, :], [TILE_T, KXP, KXP]), [TILE_T, KXP * KXP])

    for tile in range(loop_bound(pid), loop_bound(num_tiles), loop_bound(nprog)):
        rows = tile * TILE_T + lanes
        row_ok = rows < T
        rows64 = rows.to(tl.int64)
        if AXIS_THRESH:
            R: tl.constexpr = NP // 32
            kx, cx3 = _lane_keys(X, rows64, row_ok, stride_xt, stride_xn, N, R, 32, PACKED, EVEN_N)
            ky, cy3 = _lane_keys(Y, rows64, row_ok, stride_yt, stride_yn, N, R, 32, PACKED, EVEN_N)
            cx = _select_survivors(kx, cx3, KX, scr3, scr3 + M, KXP, M, PACKED)
            cy = _select_survivors(ky, cy3, KX, scr3 + SW, scr3 + SW + M, KXP, M, PACKED)
            # Scratch rows are written and read by different threads of this program.
            tl.debug_barrier()
            m = tl.arange(0, M)[None, :]
            kx = tl.load(scr + m, mask=m < cx[:, None], other=KEY_NONE)
            ky = tl.load(scr + SW + m, mask=m < cy[:, None], other=KEY_NONE)
            px = kx
            py = ky
            if not PACKED:
                px = tl.load(scr + M + m, mask=m < cx[:, None], other=0)
                py = tl.load(scr + SW + M + m, mask=m < cy[:, None], other=0)
            tx, qx = bitonic_topk(kx, px, LM, LKX, not PACKED, PACKED)
            ty, qy = bitonic_topk(ky, py, LM, LKX, not PACKED, PACKED)
        else:
            kx = _axis_keys(X, rows64, row_ok, stride_xt, stride_xn, N, NP, PACKED, EVEN_N)
            ky = _axis_keys(Y, rows64, row_ok, stride_yt, stride_yn, N, NP, PACKED, EVEN_N)
            px = cols2
            tx, qx = bitonic_topk(kx, px, LNP, LKX, not PACKED, PACKED)
            ty, qy = bitonic_topk(ky, px, LNP, LKX, not PACKED, PACKED)

        if GRID == 1:
            a = tl.arange(0, KXP)[None, :]
            tl.store(scr + 2 * SW + a, tx)
            tl.store(scr + 2 * SW + LW + a, ty)
            if not PACKED:
                tl.store(scr + 2 * SW + KXP + a, qx)
                tl.store(scr + 2 * SW + LW + KXP + a, qy)
            tl.debug_barrier()
            ka = tl.load(scr + 2 * SW + ca, mask=cvalid, other=KEY_NONE)
            kb = tl.load(scr + 2 * SW + LW + cb, mask=cvalid, other=KEY_NONE)
            if PACKED:
                qa = ka
                qb = kb
            else:
                qa = tl.load(scr + 2 * SW + KXP + ca, mask=cvalid, other=0)
                qb = tl.load(scr + 2 * SW + LW + KXP + cb, mask=cvalid, other=0)
            va, ia = _decode(ka, qa, DT, PACKED)
            vb, ib = _decode(kb, qb, DT, PACKED)
            gkey = tl.where(cvalid, f32_key(va + vb), KEY_NONE)
            gpay = ia * N + ib
        else:
            vx, ix = _decode(tx, qx, DT, PACKED)
            vy, iy = _decode(ty, qy, DT, PACKED)
            s3 = vx[:, :, None] + vy[:, None, :]
            f3 = ix[:, :, None] * N + iy[:, None, :]
            gkey = tl.where(gvalid, f32_key(tl.reshape(s3, [TILE_T, KXP * KXP])), KEY_NONE)
            gpay = tl.reshape(f3, [TILE_T, KXP * KXP])
        top, flat = bitonic_topk(gkey, gpay, LC, LKO, True)
        om = row_ok[:, None] & (ko[None, :] < K)
        tl.store(S + rows64[:, None] * stride_st + ko[None, :] * stride_sk,
                 to_dtype(f32_from_key(top), S.dtype.element_ty), mask=om)
        tl.store(I + rows64[:, None] * stride_it + ko[None, :] * stride_ik, flat, mask=om)


# ---------------------------------------------------------------------------------------
# Streaming kernel: one token per thread (or per few lanes), everything in registers.
#
# Only layout-preserving operations are used on the [R, L] register tensors below (R
# rows spread over lanes and warps, L in each thread's registers): element-wise math,
# reshapes/permutes that only rename registers, and exchanges with the partner along a
# size-2 axis (_triton._partner), which fold to register moves inside a thread.  So the
# sorting networks compile to plain min/max/select instructions with no shuffles, no
# shared memory and no barriers.
# ---------------------------------------------------------------------------------------


@triton.jit
def _hyper(x, LB: tl.constexpr):
    return tl.reshape(x, [x.shape[0]] + [2] * LB)


@triton.jit
def _flip(x, LB: tl.constexpr):
    # Reverse the last axis (L = 2^LB): flip every index bit.
    R: tl.constexpr = x.shape[0]
    h = _hyper(x, LB)
    for i in tl.static_range(LB):
        h = _partner(h, i + 1)
    return tl.reshape(h, [R, 2**LB])


@triton.jit
def _bit(LB: tl.constexpr, i: tl.constexpr):
    # Bit i of the position, shaped to broadcast over a hypercube of rank LB + 1.
    return _pair_side(LB + 1, LB - i)


@triton.jit
def _bcast_elem(x, a: tl.constexpr, LB: tl.constexpr):
    # Every position of row r gets x[r, a] (a constant): walk the bits where the
    # position differs from a, swapping with the partner along each.
    R: tl.constexpr = x.shape[0]
    h = _hyper(x, LB)
    for i in tl.static_range(LB):
        h = tl.where(_bit(LB, i) == ((a >> i) & 1), h, _partner(h, LB - i))
    return tl.reshape(h, [R, 2**LB])


@triton.jit
def _shift_down(x, SB: tl.constexpr, LB: tl.constexpr, fill):
    # y[r, q] = x[r, q + 2^SB] (fill past the end).  Adding 2^SB increments the bit
    # field above bit SB: flip bits SB..SB+t where t counts the trailing ones there.
    R: tl.constexpr = x.shape[0]
    h = _hyper(x, LB)
    out = tl.full(h.shape, fill, h.dtype)
    g = h
    ones = _bit(LB, SB) != 0  # bits SB..SB+t-1 all one so far
    for t in tl.static_range(LB - SB):
        g = _partner(g, LB - (SB + t))  # bits SB..SB+t flipped
        if t == 0:
            hit = _bit(LB, SB) == 0
        else:
            hit = ones & (_bit(LB, SB + t) == 0)
            ones = ones & (_bit(LB, SB + t) != 0)
        out = tl.where(hit, g, out)
    return tl.reshape(out, [R, 2**LB])


@triton.jit
def _merge_top(rk, rp, bk, bp, LB: tl.constexpr, HAS_P: tl.constexpr, DISTINCT: tl.constexpr):
    # Top L of two descending lists of L: the element-wise max of one with the other
    # reversed is a bitonic sequence holding the top L; one bitonic merge sorts it.
    R: tl.constexpr = rk.shape[0]
    fk = _flip(bk, LB)
    take = fk > rk
    h = tl.where(take, fk, rk)
    p = h
    if HAS_P:
        p = tl.where(take, _flip(bp, LB), rp)
    h = _hyper(h, LB)
    p = _hyper(p, LB)
    for i in tl.static_range(LB):
        h, p = _cas(h, p, i + 1, 1, HAS_P, DISTINCT)
    return tl.reshape(h, [R, 2**LB]), tl.reshape(p, [R, 2**LB])


@triton.jit
def _chunk_piece(P, tok64, row_ok, stride_t, stride_n, N, col0, v: tl.constexpr,
                 E: tl.constexpr, PACKED: tl.constexpr, EVEN_N: tl.constexpr):
    # [R, E] keys (and columns) of columns col0 + v*E .. col0 + v*E + E - 1: one 16-byte
    # load per thread, a whole piece per row.
    col = col0[:, None] + v * E + tl.arange(0, E)[None, :]
    if EVEN_N:
        # No mask: rows past T were clamped to row T - 1 by the caller (their results are
        # never stored), so the load stays unmasked and vectorised.
        x = tl.load(P + tok64[:, None] * stride_t + col.to(tl.int64) * stride_n)
    else:
        ok = row_ok[:, None] & (col < N)
        x = tl.load(P + tok64[:, None] * stride_t + col.to(tl.int64) * stride_n, mask=ok, other=0.0)
    return _keys_of(x, col, N, PACKED, EVEN_N), col


@triton.jit
def _chunk_keys(P, tok64, row_ok, stride_t, stride_n, N, col0, PACKED: tl.constexpr,
                EVEN_N: tl.constexpr):
    # Keys (and columns) of 16 consecutive columns col0[r] .. col0[r] + 15 for each row,
    # as V separate [R, E] loads (E * b = 16 bytes) joined along new minor axes.  One
    # [V, R, E] load would be shorter, but Triton 3.6 then spreads V over lanes (by
    # contiguity) and every compare-exchange on the row needs a shuffle; separate loads
    # each get a row-per-thread layout and tl.join keeps the pieces in registers.
    V: tl.constexpr = 2 if PACKED else 4
    E: tl.constexpr = 16 // V
    R: tl.constexpr = col0.shape[0]
    k0, c0 = _chunk_piece(P, tok64, row_ok, stride_t, stride_n, N, col0, 0, E, PACKED, EVEN_N)
    k1, c1 = _chunk_piece(P, tok64, row_ok, stride_t, stride_n, N, col0, 1, E, PACKED, EVEN_N)
    if V == 2:
        key = tl.permute(tl.join(k0, k1), [0, 2, 1])  # [R, v, e]
        col = tl.permute(tl.join(c0, c1), [0, 2, 1])
    else:
        k2, c2 = _chunk_piece(P, tok64, row_ok, stride_t, stride_n, N, col0, 2, E, PACKED, EVEN_N)
        k3, c3 = _chunk_piece(P, tok64, row_ok, stride_t, stride_n, N, col0, 3, E, PACKED, EVEN_N)
        # join(join(v0=0, v0=1), join(...)) is [R, e, v0, v1] for v = 2*v1 + v0.
        key = tl.permute(tl.join(tl.join(k0, k1), tl.join(k2, k3)), [0, 3, 2, 1])
        col = tl.permute(tl.join(tl.join(c0, c1), tl.join(c2, c3)), [0, 3, 2, 1])
    return tl.reshape(key, [R, 16]), tl.reshape(col, [R, 16])


@triton.jit
def _lane_merge(rk, rp, LLPT: tl.constexpr, LKX: tl.constexpr, HAS_P: tl.constexpr,
                DISTINCT: tl.constexpr):
    # Merge the sorted top lists of groups of 2^LLPT consecutive rows (a token's lanes)
    # by LLPT butterfly exchanges; afterwards every row of a group holds the group's list.
    R: tl.constexpr = rk.shape[0]
    KXP: tl.constexpr = 2**LKX
    for j in tl.static_range(LLPT):
        ok_ = tl.reshape(_partner(tl.reshape(rk, [R // (2 << j), 2, 1 << j, KXP]), 1), [R, KXP])
        op_ = ok_
        if HAS_P:
            op_ = tl.reshape(_partner(tl.reshape(rp, [R // (2 << j), 2, 1 << j, KXP]), 1), [R, KXP])
        rk, rp = _merge_top(rk, rp, ok_, op_, LKX, HAS_P, DISTINCT)
    return rk, rp


@triton.jit
def _stack2(a, b):
    # [R, L] and [R, L] -> [2R, L] (rows of a, then rows of b), kept in registers: the
    # new row bit comes from tl.join's in-thread axis.
    R: tl.constexpr = a.shape[0]
    L: tl.constexpr = a.shape[1]
    return tl.reshape(tl.permute(tl.join(a, b), [2, 0, 1]), [2 * R, L])


@triton.jit
def _unstack2(s):
    # Inverse of _stack2.
    R2: tl.constexpr = s.shape[0]
    L: tl.constexpr = s.shape[1]
    return tl.split(tl.permute(tl.reshape(s, [2, R2 // 2, L]), [1, 2, 0]))


@triton.jit
def _stream_axes(X, Y, tok64, row_ok, part, stride_xt, stride_xn, stride_yt, stride_yn, N,
                 SEG: tl.constexpr, LKX: tl.constexpr, LLPT: tl.constexpr,
                 PACKED: tl.constexpr, EVEN_N: tl.constexpr):
    # Sorted top-KXP keys (+ columns) of each token's x row and y row; lane `part` of the
    # token streams columns [part * SEG, (part + 1) * SEG) of both in chunks of 16, then
    # the 2^LLPT lanes of a token merge their lists through LLPT butterfly exchanges.
    # The two axes travel as one [2R, .] tensor (x rows, then y rows; both in the same
    # thread): one copy of the sorting code, and two independent dependency chains per
    # thread for the scheduler to interleave.
    R: tl.constexpr = tok64.shape[0]
    R2: tl.constexpr = 2 * R
    KXP: tl.constexpr = 2**LKX
    rk = tl.full([R2, KXP], KEY_NONE, tl.int32)
    rp = tl.zeros([R2, KXP], tl.int32)
    col0 = part * SEG
    for c in range(0, SEG, 16):
        cc = tl.multiple_of(col0 + c, 16)
        xk, xp = _chunk_keys(X, tok64, row_ok, stride_xt, stride_xn, N, cc, PACKED, EVEN_N)
        yk, yp = _chunk_keys(Y, tok64, row_ok, stride_yt, stride_yn, N, cc, PACKED, EVEN_N)
        ck = _stack2(xk, yk)
        cp = ck
        if not PACKED:
            cp = _stack2(xp, yp)
        ck, cp = bitonic_topk(ck, cp, 4, LKX, not PACKED, PACKED)
        rk, rp = _merge_top(rk, rp, ck, cp, LKX, not PACKED, PACKED)
    # Row = axis * R + lane: the lanes of a token differ in the low bits of the row.
    rk, rp = _lane_merge(rk, rp, LLPT, LKX, not PACKED, PACKED)
    if LLPT > 0 and not PACKED:
        # float32 keys can tie, and tied entries may then sit at different ranks in the
        # token's lanes; the grid stage needs one list, so every lane takes lane 0's.
        lane0 = (tl.arange(0, 2**LLPT) == 0)[None, :, None]
        rk = tl.reshape(tl.broadcast_to(tl.sum(tl.where(lane0, tl.reshape(rk, [R2 >> LLPT, 2**LLPT, KXP]), 0), axis=1, keep_dims=True), [R2 >> LLPT, 2**LLPT, KXP]), [R2, KXP])
        rp = tl.reshape(tl.broadcast_to(tl.sum(tl.where(lane0, tl.reshape(rp, [R2 >> LLPT, 2**LLPT, KXP]), 0), axis=1, keep_dims=True), [R2 >> LLPT, 2**LLPT, KXP]), [R2, KXP])
    xk, yk = _unstack2(rk)
    xp, yp = _unstack2(rp)
    return xk, xp, yk, yp


@triton.jit
def _store_rows(P, tok64, stride_t, stride_k, vals, mask_row, K):
    # Store vals [R, L] into P[tok, 0:K] with one 16-byte store per thread and piece.
    R: tl.constexpr = vals.shape[0]
    L: tl.constexpr = vals.shape[1]
    BYTES: tl.constexpr = vals.dtype.primitive_bitwidth // 8
    E0: tl.constexpr = 16 // BYTES
    E: tl.constexpr = E0 if E0 < L else L
    V: tl.constexpr = L // E
    v3 = tl.permute(tl.reshape(vals, [R, V, E]), [1, 0, 2])
    col = tl.arange(0, V)[:, None, None] * E + tl.arange(0, E)[None, None, :]
    tl.store(P + tok64[None, :, None] * stride_t + col.to(tl.int64) * stride_k, v3,
             mask=mask_row[None, :, None] & (col < K))


@triton.jit
def _pruned_router_stream_kernel(
    X, Y, S, I,
    T, N, K, KX,
    stride_xt, stride_xn, stride_yt, stride_yn,
    stride_st, stride_sk, stride_it, stride_ik,
    R: tl.constexpr, LLPT: tl.constexpr, SEG: tl.constexpr, LKX: tl.constexpr,
    SB: tl.constexpr, KS: tl.constexpr, PACKED: tl.constexpr, EVEN_N: tl.constexpr,
    GSPLIT: tl.constexpr,
):
    """Exact top-K (K <= 16 <= N) of x[t, i] + y[t, j], LPT threads per token.

    Writes S[t, :K] (sorted descending, input dtype, RNE) and I[t, :K] (int32 i*N + j).
    Grid: (cdiv(T, R // LPT),) with LPT = 2^LLPT; thread r of program p serves token
    p * R / LPT + r // LPT.
    Per axis, each of a token's LPT threads streams SEG columns in chunks of 16 (sorted
    by a 16-key bitonic network, merged into a running sorted top-KXP), then the LPT
    lists merge by butterfly exchanges.  The grid stage forms the candidate pairs as
    blocks that are already sorted -- rows a < 2^SB of (a, *) and columns b < 2^SB of
    (2^SB + *, b): with (2^SB + 1)^2 > K no other pair has (a + 1)(b + 1) <= K -- and
    merges them into a running top-KXP (KS = K as a constant: blocks that cannot hold a
    candidate are skipped at compile time; with GSPLIT the LPT lanes of a token share the
    blocks and merge by butterfly exchanges).  Everything stays in registers.
    Bytes: reads 2*T*N*b logits once, writes T*K*(b + 4).
    """
    KXP: tl.constexpr = 2**LKX
    LPT: tl.constexpr = 2**LLPT
    BT: tl.constexpr = R // LPT
    pid = tl.program_id(0)
    r = tl.arange(0, R)
    tok = pid * BT + r // LPT
    part = r % LPT
    row_ok = tok < T
    tok64 = tl.minimum(tok, T - 1).to(tl.int64)
    xk, xp, yk, yp = _stream_axes(X, Y, tok64, row_ok, part, stride_xt, stride_xn, stride_yt,
                                  stride_yn, N, SEG, LKX, LLPT, PACKED, EVEN_N)
    DT: tl.constexpr = X.dtype.element_ty
    vx, ix = _decode(xk, xp, DT, PACKED)
    vy, iy = _decode(yk, yp, DT, PACKED)
    store_ok = row_ok & (part == 0)
    q = tl.arange(0, KXP)[None, :]
    SP: tl.constexpr = 2**SB
    vxs = _shift_down(vx, SB, LKX, 0.0)
    ixs = _shift_down(ix, SB, LKX, 0)
    rk = tl.full([R, KXP], KEY_NONE, tl.int32)
    rp = tl.zeros([R, KXP], tl.int32)
    if GSPLIT:
        # The token's LPT lanes share the candidate blocks: lane `part` builds blocks
        # part, part + LPT, ... (rows a < SP first, then columns b < SP), then the
        # lanes merge their lists by butterfly exchanges.
        qi = tl.arange(0, KXP)[None, :]
        for i in tl.static_range((2 * SP + LPT - 1) // LPT):
            blk = part + LPT * i  # [R]
            is_row = blk < SP
            a = tl.where(is_row, blk, 0)[:, None]
            b = tl.where(is_row, 0, blk - SP)[:, None]
            # element a of the x list / b of the y list, per row (selects in registers)
            xa = tl.sum(tl.where(qi == a, xk, 0), axis=1)[:, None]
            xa_i = tl.sum(tl.where(qi == a, xp, 0), axis=1)[:, None]
            yb = tl.sum(tl.where(qi == b, yk, 0), axis=1)[:, None]
            yb_i = tl.sum(tl.where(qi == b, yp, 0), axis=1)[:, None]
            va, ia = _decode(xa, xa_i, DT, PACKED)
            vb, ib = _decode(yb, yb_i, DT, PACKED)
            r2 = is_row[:, None]
            s = tl.where(r2, va + vy, vxs + vb)
            fl = tl.where(r2, ia * N + iy, ixs * N + ib)
            ai = tl.where(r2, a, SP + q)
            bi = tl.where(r2, q, b)
            ok = ((blk < 2 * SP)[:, None] & (ai < KX) & (bi < KX)
                  & ((ai + 1) * (bi + 1) <= K))
            bk = tl.where(ok, f32_key(s), KEY_NONE)
            rk, rp = _merge_top(rk, rp, bk, fl, LKX, True, False)
        rk, rp = _lane_merge(rk, rp, LLPT, LKX, True, False)
    else:
        for blk in tl.static_range(2 * SP):
            if blk < SP:
                if blk + 1 <= KS:
                    # row a = blk: (a, q), descending in q
                    s = _bcast_elem(vx, blk, LKX) + vy
                    fl = _bcast_elem(ix, blk, LKX) * N + iy
                    ok = (blk < KX) & (q < KX) & ((blk + 1) * (q + 1) <= K)
                    bk = tl.where(ok, f32_key(s), KEY_NONE)
                    if blk == 0:
                        rk = bk
                        rp = fl
                    else:
                        rk, rp = _merge_top(rk, rp, bk, fl, LKX, True, False)
            else:
                if (SP + 1) * (blk - SP + 1) <= KS:
                    # column b = blk - SP: (SP + q, b), descending in q
                    s = vxs + _bcast_elem(vy, blk - SP, LKX)
                    fl = ixs * N + _bcast_elem(iy, blk - SP, LKX)
                    ok = ((SP + q < KX) & (blk - SP < KX)
                          & ((SP + q + 1) * (blk - SP + 1) <= K))
                    bk = tl.where(ok, f32_key(s), KEY_NONE)
                    rk, rp = _merge_top(rk, rp, bk, fl, LKX, True, False)
    sc = to_dtype(f32_from_key(rk), S.dtype.element_ty)
    _store_rows(S, tok64, stride_st, stride_sk, sc, store_ok, K)
    _store_rows(I, tok64, stride_it, stride_ik, rp, store_ok, K)


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------

def _log2(v: int) -> int:
    return int(v).bit_length() - 1


def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


# Fast-path limits of the two kernels here; beyond them ``pruned_router_forward`` runs
# the large-k kernel (docs/router.md).
MAX_FAST_K = 256
# From this k on the large-k kernel runs even where the fast path applies (H100, bf16,
# unsorted: at T = 4096, N = 320 the warp kernel is ahead at k = 96, 218 us vs 287, and
# behind at k = 128, 401 vs 298; at T = 16384, N = 128, k = 128: 1401 vs 526).
LARGE_K_MIN_K = 128
MAX_FAST_N = 4096
_MAX_SORT_WIDTH = 4096
# From this many tokens the streaming kernel is chosen for k <= 16: below it both kernels
# take about the same time, from it streaming is faster (docs/router.md, "Launch rules
# of the pruned forward").
STREAM_MIN_T = 4096


@functools.lru_cache(maxsize=None)
def candidate_pairs(k: int, kx: int) -> tuple[tuple[int, int], ...]:
    """Rank pairs (a, b), a, b < kx, with (a + 1) * (b + 1) <= k (at least k of them)."""
    return tuple((a, b) for a in range(kx) for b in range(min(kx, k // (a + 1))))


def candidate_width(k: int, kx: int) -> int:
    """Padded length of the pruned candidate list (>= next_pow2(k))."""
    return max(_pow2(len(candidate_pairs(k, kx))), _pow2(k))


def fast_path_ok(N: int, k: int) -> bool:
    """Whether (N, k) runs in a Triton kernel (else the PyTorch pruned reference)."""
    if k < 1 or k > MAX_FAST_K or _pow2(N) > MAX_FAST_N:
        return False
    kx = min(k, N)
    return min(candidate_width(k, kx), _pow2(kx) ** 2) <= _MAX_SORT_WIDTH


def use_large_k(N: int, k: int) -> bool:
    """Whether the default rule sends (N, k) to the large-k kernel."""
    return k >= 1 and large_k_ok(N) and (k >= LARGE_K_MIN_K or not fast_path_ok(N, k))


def stream_ok(N: int, k: int) -> bool:
    """Whether the streaming (token-per-thread) kernel applies: k <= 16 <= next_pow2(N)."""
    return 1 <= k <= 16 and _pow2(N) >= 16


def threshold_ok(N: int, k: int, lm: int) -> bool:
    """Whether the warp kernel's threshold per-axis stage applies with M = 2^lm slots.

    Rows are cut into 32 lanes of NP/32 columns; the k'' = next_pow2(k') <= 32 groups
    (interleaved lanes) whose maxima bound the threshold must each hold a real column.
    """
    NP = _pow2(N)
    kxp = _pow2(min(k, N))
    m = 1 << lm
    if NP < 64 or NP < 2 * m or m < kxp or kxp > 32:
        return False
    if N == NP:
        return True
    return kxp <= 16  # lanes g < k'' own a real column only if (k''-1)*NP/32 < N


@dataclass(frozen=True)
class StreamConfig:
    """Launch configuration of the streaming kernel (k <= 16 <= next_pow2(N)).

    lpt: threads per token, a power of two, at most min(32, next_pow2(N) / 16) (each
        thread streams >= 16 columns).
    warps: warps per program (32 * warps threads).
    gsplit: with lpt > 1, a token's threads share the grid stage's candidate blocks.
    """

    lpt: int = 1
    warps: int = 4
    gsplit: bool = False


@dataclass(frozen=True)
class WarpConfig:
    """Launch configuration of the warp kernel (every fast-path shape).

    tile_t: tokens per tile (a power of two); warps: warps per program; thresh: use the
        threshold per-axis stage (needs ``threshold_ok(N, k, lm)``) instead of the
        full-row bitonic top-k'; lm: log2 of the survivor slots M of that stage; grid: 0
        = all k''^2 grid pairs in registers, 1 = the pruned pairs fetched through
        scratch; progs_per_sm: persistent programs per multiprocessor.
    """

    tile_t: int = 4
    warps: int = 4
    thresh: bool = False
    lm: int = 0
    grid: int = 0
    progs_per_sm: int = 8


def _stream_rule(T: int, N: int) -> StreamConfig:
    # About 32K threads in flight: LPT = next_pow2(32768 / T) threads per token (the
    # sweep behind it: docs/router.md, "Launch rules of the pruned forward").  With
    # LPT > 1 the token's lanes share the grid stage.
    lpt = _pow2(max(1, -(-32768 // max(1, T))))
    lpt = max(1, min(lpt, 32, _pow2(N) // 16))
    return StreamConfig(lpt=lpt, warps=4, gsplit=lpt > 1)


def _warp_rule(T: int, N: int, k: int, sm_major: int) -> WarpConfig:
    # docs/router.md, "Launch rules of the pruned forward": small CTAs (2 tokens, 2 warps) are fastest
    # at large T; at T <= 4096 and N <= 256 the full-row per-axis sort beats the
    # threshold stage (no scratch round trip).
    NP = _pow2(N)
    kx = min(k, N)
    kxp = _pow2(kx)
    lm = _log2(2 * kxp)
    cp = candidate_width(k, kx)
    grid = 1 if cp < kxp * kxp else 0
    thresh = threshold_ok(N, k, lm)
    if T > 4096 or NP > 256:
        tile_t, warps = 2, 2
    else:
        tile_t, warps = 4, 4
        thresh = False
    if NP <= 64:
        tile_t, warps = 2, 2
    widest = max(NP, cp if grid else kxp * kxp)
    tile_t = max(1, min(tile_t, (32 * 32 * warps) // widest))
    tile_t = min(tile_t, _pow2(max(1, T)))
    return WarpConfig(tile_t=tile_t, warps=warps, thresh=thresh, lm=lm, grid=grid,
                      progs_per_sm=8 if sm_major >= 9 else 4)


def default_config(T: int, N: int, k: int, sm_major: int = 9, kernel: str | None = None,
                   sorted: bool = True) -> StreamConfig | WarpConfig | LargeKConfig | None:
    """The launch configuration ``pruned_router_forward`` uses for a shape.

    The rule, measured on an H100 (sm90; docs/router.md): the large-k kernel from
    k = ``LARGE_K_MIN_K`` and wherever the fast path ends; below, the streaming kernel
    for k <= 16 from T = ``STREAM_MIN_T`` tokens, else the warp kernel.  ``kernel``
    ("stream", "warp" or "large_k") asks for that kernel's rule instead (e.g. to start a
    tuning sweep from it).  None: no kernel serves the shape (next_pow2(N) > 4096 past
    the fast path) and a PyTorch algorithm runs on the same device.
    """
    if kernel not in (None, "stream", "warp", "large_k"):
        raise ValueError(f"kernel must be None, 'stream', 'warp' or 'large_k', got {kernel!r}")
    if kernel == "large_k" or (kernel is None and use_large_k(N, k)):
        return large_k_config(T, N, k, sm_major, sorted)
    if not fast_path_ok(N, k):
        return None
    if kernel == "stream" or (kernel is None and stream_ok(N, k) and T >= STREAM_MIN_T):
        if not stream_ok(N, k):
            raise ValueError(f"the streaming kernel needs 1 <= k <= 16 <= next_pow2(N), got N={N}, k={k}")
        return _stream_rule(T, N)
    return _warp_rule(T, N, k, sm_major)


class _Launch(NamedTuple):
    """Everything about a launch that depends only on the shape and the config."""

    kernel: str            # "stream" or "warp"
    programs: int
    kx: int
    num_tiles: int         # warp kernel: token tiles (persistent loop)
    scratch_words: int     # warp kernel: int32 scratch words
    cand: torch.Tensor | None
    constants: dict


def _stream_launch(T, N, k, packed, cfg: StreamConfig) -> _Launch:
    if not stream_ok(N, k):
        raise ValueError(f"StreamConfig needs 1 <= k <= 16 <= next_pow2(N), got N={N}, k={k}")
    NP = _pow2(N)
    lpt = check_pow2("config.lpt", cfg.lpt)
    if lpt > min(32, NP // 16):
        raise ValueError(f"config.lpt must be <= min(32, next_pow2(N) / 16) = "
                         f"{min(32, NP // 16)} at N={N}, got {lpt}")
    warps = check_pow2("config.warps", cfg.warps)
    if cfg.gsplit and lpt == 1:
        raise ValueError("config.gsplit needs lpt > 1")
    R = 32 * warps
    sb = 0
    while ((1 << sb) + 1) ** 2 <= k:
        sb += 1
    kx = min(k, N)
    consts = dict(R=R, LLPT=_log2(lpt), SEG=NP // lpt, LKX=_log2(_pow2(kx)), SB=sb, KS=k,
                  PACKED=packed, EVEN_N=(N == NP), GSPLIT=bool(cfg.gsplit), num_warps=warps)
    return _Launch("stream", triton.cdiv(T, R // lpt), kx, 0, 0, None, consts)


def _warp_launch(T, N, k, packed, cfg: WarpConfig, sms: int, device) -> _Launch:
    NP = _pow2(N)
    kx = min(k, N)
    kxp = _pow2(kx)
    lm = check_int("config.lm", cfg.lm, 0) if cfg.thresh else 0
    if cfg.thresh and not threshold_ok(N, k, lm):
        raise ValueError(f"config.thresh: the threshold stage does not apply at N={N}, k={k}, "
                         f"lm={lm} (see threshold_ok)")
    grid = check_int("config.grid", cfg.grid, 0, 1)
    tile_t = check_pow2("config.tile_t", cfg.tile_t)
    warps = check_pow2("config.warps", cfg.warps)
    progs_per_sm = check_int("config.progs_per_sm", cfg.progs_per_sm, 1)
    if grid:
        width = candidate_width(k, kx)
        pairs = candidate_pairs(k, kx)
        cand = torch.tensor([(a << 16) | b for a, b in pairs] + [-1] * (width - len(pairs)),
                            dtype=torch.int32, device=device)
    else:
        width = kxp * kxp
        cand = None
    num_tiles = triton.cdiv(T, tile_t)
    nprog = max(1, min(num_tiles, sms * progs_per_sm))
    npay = 1 if packed else 2
    words = (2 * (1 << lm) * npay if cfg.thresh else 0) + (2 * kxp * npay if grid else 0)
    consts = dict(TILE_T=tile_t, LNP=_log2(NP), LKX=_log2(kxp), LKO=_log2(_pow2(k)),
                  LC=_log2(width), LM=lm, AXIS_THRESH=bool(cfg.thresh), GRID=grid,
                  PACKED=packed, EVEN_N=(N == NP), num_warps=warps)
    return _Launch("warp", nprog, kx, num_tiles, max(1, nprog * tile_t * words), cand, consts)


def plan(T: int, N: int, k: int, dtype: torch.dtype, device: torch.device,
         config: StreamConfig | WarpConfig | None = None) -> _Launch | None:
    """The fast-path launch ``pruned_router_forward`` makes for this shape and config.
    None: no fast-path kernel runs (the large-k kernel or a PyTorch algorithm does).
    Raises TypeError/ValueError for a config that is not one or does not apply to the
    shape."""
    if config is not None and not isinstance(config, (StreamConfig, WarpConfig)):
        raise TypeError(f"config must be a StreamConfig, WarpConfig or LargeKConfig, got {type(config).__name__}")
    return _plan(T, N, k, dtype, device, config)


# Cached: host time matters when the kernel itself takes a few microseconds.
@functools.lru_cache(maxsize=4096)
def _plan(T, N, k, dtype, device, config) -> _Launch | None:
    sms, major = device_info(device)
    if config is None:
        config = default_config(T, N, k, major)
        if config is None or isinstance(config, LargeKConfig):
            return None
    elif not fast_path_ok(N, k):
        raise ValueError(f"no Triton kernel serves N={N}, k={k} (past the fast path); "
                         f"leave config=None")
    packed = dtype != torch.float32
    if isinstance(config, StreamConfig):
        return _stream_launch(T, N, k, packed, config)
    return _warp_launch(T, N, k, packed, config, sms, device)


def pruned_router_forward(x: torch.Tensor, y: torch.Tensor, k: int, scores=None, indices=None,
                          *, config: StreamConfig | WarpConfig | LargeKConfig | None = None,
                          sorted: bool = True):
    """Exact top-k of x[t, i] + y[t, j]; returns (scores (T, k) x.dtype, indices (T, k) int32).

    x, y: (T, N) float32/float16/bfloat16, any strides, same device (CUDA, or CPU under
    TRITON_INTERPRET=1).  ``scores``/``indices`` may be preallocated (any strides).
    One kernel launch on the fast path (extra memory O(programs * tile * (M + k')) int32
    words); the large-k kernel past it (``large_k.py``); a PyTorch algorithm beyond
    next_pow2(N) = 4096 past the fast path.  ``config``: a ``StreamConfig``,
    ``WarpConfig`` or ``LargeKConfig`` to use instead of ``default_config``'s choice;
    one that does not apply raises ValueError.  ``sorted=False`` lets the large-k
    kernel (and the PyTorch large-k algorithm) skip the final sort: the same pairs,
    grouped by x rank (``large_k.py``); the fast-path kernels sort anyway.
    """
    T, N = x.shape
    if isinstance(config, LargeKConfig) or (config is None and use_large_k(N, k)):
        return large_k_router_forward(x, y, k, scores, indices, sorted=sorted, config=config)
    if scores is None:
        scores = torch.empty((T, k), dtype=x.dtype, device=x.device)
    if indices is None:
        indices = torch.empty((T, k), dtype=torch.int32, device=x.device)
    if T == 0 or k == 0:
        return scores, indices
    launch = plan(T, N, k, x.dtype, x.device, config)
    if launch is None:
        s, i = router_cpu(x, y, k, sorted)
        scores.copy_(s)
        indices.copy_(i)
        return scores, indices
    strides = (x.stride(0), x.stride(1), y.stride(0), y.stride(1),
               scores.stride(0), scores.stride(1), indices.stride(0), indices.stride(1))
    if launch.kernel == "stream":
        _pruned_router_stream_kernel[(launch.programs,)](
            x, y, scores, indices, T, N, k, launch.kx, *strides, **launch.constants)
        return scores, indices
    scratch = torch.empty(launch.scratch_words, dtype=torch.int32, device=x.device)
    _pruned_router_fwd_kernel[(launch.programs,)](
        x, y, scores, indices, scratch, launch.cand if launch.cand is not None else indices,
        T, N, k, launch.kx, launch.num_tiles, *strides, **launch.constants,
    )
    return scores, indices
