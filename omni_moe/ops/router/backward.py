"""Router backward: gradient rows built in registers, from sorted pairs, or in fixed point.

Shared by the full-scan and the pruned router (both return the same (scores, indices)
contract, so they have the same backward):

    dx[t, i] = sum_r g[t, r] * [indices[t, r] div N == i]
    dy[t, j] = sum_r g[t, r] * [indices[t, r] mod N == j]

Three kernels, all deterministic (bitwise, run to run: fixed summation orders or exact
integer sums, every output element written once, no state between calls);
``default_config`` picks by (N, k):

- dense (``_router_bwd_kernel``, small k): O(N * k) compares per token; each program
  owns whole dx and dy rows (or a column block of them) of a few tokens, adds the
  token's k gradients into a float32 tile in the order r = 0..k-1 -- the order of the
  reference's sequential scatter-add, so the result equals
  ``router_backward_reference`` bit for bit;
- sort (``_router_bwd_sort_kernel``, large k): O(k log^2 k) per token; per axis, the
  token's pairs are sorted by (row, r) in registers, each run of equal rows is summed by
  a segmented scan (a fixed tree, in r order within the run) and the run totals are
  added into a float32 row in scratch, in blocks of ``block`` pairs.  Deterministic, but
  the tree order is not the sequential one: each element is within
  (m - 1) * 2^-24 * sum |g| of the exact sum before its one rounding to the output dtype
  (m = the terms it sums);
- fixed point (``_router_bwd_fixed_kernel``, larger k): O(k) per token; each gradient
  becomes a 64-bit integer at a per-token scale and is added into its rows with integer
  atomics, which are associative, so the sum does not depend on the order the atomics
  land in; each element is the exact sum to within K * 2^-61 * 2^e (2^e > max |g|)
  before its one rounding to float32.

Dense layout (why it is fast): the tile is [NG, TILE_T, C] with element (j, t, l) =
column j*C + l of token t.  C lanes share a token, so each thread holds NG columns of
one token and the per-pair work (load the pair, split the index) is paid once per NG
columns; the pair itself is loaded by every lane of the token (a broadcast within the
warp) so it arrives in the tile's layout with no shuffle.  Per column and pair the
compiler emits one integer compare and one predicated add.  A plain [TILE_T, N] tile
(Triton's default layout puts tokens in registers and columns across lanes) paid the
per-pair work once per 2 columns and ran 2-4x slower (H100 measurements:
docs/router.md, "Router backward").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._checks import check_int, check_pow2, with_fields
from .._dispatch import device_info
from .._triton import _pair_side, _partner, bitonic_topk, loop_bound, to_dtype, to_f32


@dataclass(frozen=True)
class BackwardConfig:
    """Launch configuration of the backward kernel.

    bn: columns per program (power of two; columns past it go to grid axis 1); c: lanes
    per token (power of two <= bn); tile_t: tokens per program (power of two); unroll:
    (index, grad) pairs per loop step; warps: warps per program.
    """

    bn: int
    c: int
    tile_t: int
    unroll: int = 4
    warps: int = 4


@dataclass(frozen=True)
class SortBackwardConfig:
    """Launch configuration of the sort-based backward kernel.

    block: pairs sorted at once (power of two >= 2; a token with more pairs is done in
    blocks); tile_t: tokens per program tile (power of two); warps: warps per program;
    progs_per_sm: persistent programs per multiprocessor (each tile lane owns
    2 * next_pow2(N) float32 and min(next_pow2(k), block) int32 of scratch).
    """

    block: int = 4096
    tile_t: int = 1
    warps: int = 4
    progs_per_sm: int = 4


@dataclass(frozen=True)
class FixedBackwardConfig:
    """Launch configuration of the fixed-point backward kernel.

    block: pairs per loop step (power of two); tile_t: tokens per program tile (power of
    two); warps: warps per program; progs_per_sm: persistent programs per multiprocessor
    (each tile lane owns 2 * next_pow2(N) int64 and int32 words of scratch); runs: sum
    each run of consecutive pairs with the same x row in registers and add it with one
    atomic (pays where a token's pairs come grouped by x row, as the unsorted large-k
    forward emits them; the sum is the same either way).
    """

    block: int = 1024
    tile_t: int = 1
    warps: int = 4
    progs_per_sm: int = 8
    runs: bool = False


@triton.jit
def _router_bwd_kernel(
    G, IDX, DX, DY,
    T, K,
    stride_gt, stride_gk, stride_it, stride_ik,
    stride_dxt, stride_dyt,
    N: tl.constexpr, BN: tl.constexpr, C: tl.constexpr, TILE_T: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """dx[t,i] = sum_r g[t,r]*[idx[t,r] div N == i];  dy[t,j] = same with idx mod N.

    Grid: (cdiv(T, TILE_T), cdiv(N, BN)).  Program (p, q) owns columns [q*BN, (q+1)*BN)
    of the dx and dy rows of tokens [p*TILE_T, (p+1)*TILE_T): it reads those tokens' K
    (index, gradient) pairs, accumulates in float32 registers in the fixed order
    r = 0..K-1 (UNROLL pairs per loop step), rounds once to the output dtype and stores
    each element once.  Bytes: reads T*K*(b + 4) per column block, writes 2*T*N*b.
    """
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    NG: tl.constexpr = BN // C
    j = tl.arange(0, NG)[:, None, None]
    t = tl.arange(0, TILE_T)[None, :, None]
    lane = tl.arange(0, C)[None, None, :]
    col = pid_n * BN + j * C + lane  # [NG, 1, C]
    rows = pid_t * TILE_T + t  # [1, TILE_T, 1]
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    # Every lane of a token loads the same address (one broadcast per warp), so the pair
    # arrives already in the tile's layout.
    lane0 = lane * 0
    pi = IDX + rows64 * stride_it + lane0
    pg = G + rows64 * stride_gt + lane0
    ax = tl.zeros((NG, TILE_T, C), dtype=tl.float32)
    ay = tl.zeros((NG, TILE_T, C), dtype=tl.float32)
    for r0 in range(0, loop_bound(K), UNROLL):
        for u in tl.static_range(UNROLL):
            r = tl.cast(r0 + u, tl.int64)  # r * stride can pass 2^31
            ok = row_ok & ((lane0 + r) < K)
            e = tl.load(pi + r * stride_ik, mask=ok, other=-1)
            g = to_f32(tl.load(pg + r * stride_gk, mask=ok, other=0.0))
            ex = e // N  # -1 (masked) gives -1: matches no column
            ey = e - ex * N
            ex = tl.where(ok, ex, -1)
            ey = tl.where(ok, ey, -1)
            # where(hit, a + g, a) rather than a + where(hit, g, 0): the same value
            # (a + 0.0 would also turn -0.0 into +0.0, which never occurs here since a
            # starts at +0.0), but it compiles to a predicated add.
            ax = tl.where(ex == col, ax + g, ax)
            ay = tl.where(ey == col, ay + g, ay)
    mask = row_ok & (col < N)
    tl.store(DX + rows64 * stride_dxt + col, to_dtype(ax, DX.dtype.element_ty), mask=mask)
    tl.store(DY + rows64 * stride_dyt + col, to_dtype(ay, DY.dtype.element_ty), mask=mask)


@triton.jit
def _segmented_sum(row, val, L: tl.constexpr):
    # Inclusive scan along the last axis of [R, 2^L] values whose row labels come in
    # runs (sorted): out[., p] = sum of val over p's run up to p.  Hypercube form, one
    # step per bit, so the interpreter runs it as whole-array operations; the tree is
    # fixed (deterministic).
    R: tl.constexpr = row.shape[0]
    h = tl.reshape(row, [R] + [2] * L)
    s = tl.reshape(val, [R] + [2] * L)
    tr = h  # aggregate of each element's block: (its last row, that row's run sum)
    tv = s
    for b in tl.static_range(L):
        # Bit b of the position is axis L - b.
        upper = _pair_side(L + 1, L - b) == 1
        pr = _partner(tr, L - b)
        pv = _partner(tv, L - b)
        # The upper half continues the lower half's trailing run when the rows match.
        s = tl.where(upper & (pr == h), pv + s, s)
        lr = tl.where(upper, pr, tr)
        lv = tl.where(upper, pv, tv)
        ur = tl.where(upper, tr, pr)
        uv = tl.where(upper, tv, pv)
        tv = tl.where(lr == ur, lv + uv, uv)
        tr = ur
    return tl.reshape(s, [R, 2**L])


@triton.jit
def _add_runs(e, ok, local, g_rows, stride_gk, r0, ACC, NXT, KB: tl.constexpr, LKB: tl.constexpr):
    # ACC[t, e[t, r]] += g[t, r] for the block's pairs (mask ok), per tile lane t: sort
    # by (e, r), sum each run, add each run's total once.  ACC, NXT: [TILE_T, 1] pointers
    # to the lanes' scratch rows; g_rows: to the lanes' gradient rows.
    key = tl.where(ok, e * KB + (KB - 1 - local), -1 - local)  # distinct; padding last
    srt, _ = bitonic_topk(key, key, LKB, LKB, False, True)
    real = srt >= 0
    srow = tl.where(real, srt >> LKB, -1)
    r = r0 + KB - 1 - (srt & (KB - 1))
    g = to_f32(tl.load(g_rows + r.to(tl.int64) * stride_gk, mask=real, other=0.0))
    run = _segmented_sum(srow, g, LKB)
    # A run ends where the next sorted pair has another row (through scratch: a register
    # tensor cannot be shifted).
    tl.debug_barrier()
    tl.store(NXT + local, srow)
    tl.debug_barrier()
    nxt = tl.load(NXT + local + 1, mask=local + 1 < KB, other=-2)
    end = real & (nxt != srow)
    acc = tl.load(ACC + srow, mask=end, other=0.0)
    tl.store(ACC + srow, acc + run, mask=end)


@triton.jit
def _lane_rows(BASE, TILE_T: tl.constexpr, NP: tl.constexpr):
    # Persistent programs keep one scratch row of 2 * NP words per tile lane (x half,
    # then y half), so the scratch size follows the grid, not T.
    lane = (tl.program_id(0) * TILE_T + tl.arange(0, TILE_T)).to(tl.int64)[:, None]
    x_rows = BASE + lane * (2 * NP)
    return lane, x_rows, x_rows + NP


@triton.jit
def _tile_rows(tile, T, G, stride_gt, TILE_T: tl.constexpr):
    rows = tile * TILE_T + tl.arange(0, TILE_T)
    rows64 = rows.to(tl.int64)[:, None]  # rows64 * stride can pass 2^31
    return rows64, (rows < T)[:, None], G + rows64 * stride_gt


@triton.jit
def _zero_rows(X_ROWS, Y_ROWS, cols, TILE_T: tl.constexpr, NP: tl.constexpr, DTYPE: tl.constexpr):
    tl.store(X_ROWS + cols, tl.zeros([TILE_T, NP], dtype=DTYPE))
    tl.store(Y_ROWS + cols, tl.zeros([TILE_T, NP], dtype=DTYPE))


@triton.jit
def _router_bwd_sort_kernel(
    G, IDX, DX, DY, ACC, NXT,
    T, K, N, num_tiles,
    stride_gt, stride_gk, stride_it, stride_ik,
    stride_dxt, stride_dyt,
    TILE_T: tl.constexpr, NP: tl.constexpr, KB: tl.constexpr, LKB: tl.constexpr,
):
    """dx, dy as ``_router_bwd_kernel`` computes them, from sorted pairs.

    Grid: (P,) persistent programs; program p handles tiles p, p + P, ... of TILE_T
    tokens; tile lane l has float32 rows ACC[p*TILE_T + l, 0:NP] (dx) and [NP:2NP] (dy)
    and NXT[p*TILE_T + l, 0:KB].  Per block of KB = 2^LKB pairs, each axis's pairs are
    sorted by (row, r) and summed run by run (``_add_runs``); the rows are then rounded
    once and stored whole.  Bytes: reads T*K*(b + 4) (g twice), writes 2*T*N*b.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lane, ax_acc, ay_acc = _lane_rows(ACC, TILE_T, NP)
    # KB words, not split by axis: _add_runs reuses it for x, then y.
    nxt = NXT + lane * KB
    cols = tl.arange(0, NP)[None, :]
    local = tl.arange(0, KB)[None, :]
    for tile in range(loop_bound(pid), loop_bound(num_tiles), loop_bound(nprog)):
        rows64, row_ok, g_rows = _tile_rows(tile, T, G, stride_gt, TILE_T)
        # The previous tile's rows have been read by every thread.
        tl.debug_barrier()
        _zero_rows(ax_acc, ay_acc, cols, TILE_T, NP, tl.float32)
        for r0 in range(0, loop_bound(K), KB):
            r = r0 + local
            ok = row_ok & (r < K)
            e = tl.load(IDX + rows64 * stride_it + r.to(tl.int64) * stride_ik, mask=ok, other=0)
            ex = e // N
            _add_runs(ex, ok, local, g_rows, stride_gk, r0, ax_acc, nxt, KB, LKB)
            _add_runs(e - ex * N, ok, local, g_rows, stride_gk, r0, ay_acc, nxt, KB, LKB)
        tl.debug_barrier()
        m = row_ok & (cols < N)
        tl.store(DX + rows64 * stride_dxt + cols, to_dtype(tl.load(ax_acc + cols), DX.dtype.element_ty), mask=m)
        tl.store(DY + rows64 * stride_dyt + cols, to_dtype(tl.load(ay_acc + cols), DY.dtype.element_ty), mask=m)


@triton.jit
def _run_sums(val, head, L: tl.constexpr):
    # Inclusive sums along the last axis of [R, 2^L] integers over runs that start where
    # head != 0: out[., p] = sum of val from the start of p's run to p.  Hypercube form,
    # one step per bit (whole-array operations under the interpreter); integer sums, so
    # the tree does not change the result.
    R: tl.constexpr = val.shape[0]
    s = tl.reshape(val, [R] + [2] * L)
    seen = tl.reshape(head, [R] + [2] * L)  # a run starts between the group's start and p
    tv = s      # the group's trailing run sum
    th = seen   # whether the group holds a run start
    for b in tl.static_range(L):
        upper = _pair_side(L + 1, L - b) == 1
        pv = _partner(tv, L - b)
        ph = _partner(th, L - b)
        s = tl.where(upper & (seen == 0), s + pv, s)
        seen = tl.where(upper, seen | ph, seen)
        lv = tl.where(upper, pv, tv)
        lh = tl.where(upper, ph, th)
        uv = tl.where(upper, tv, pv)
        uh = tl.where(upper, th, ph)
        tv = tl.where(uh != 0, uv, lv + uv)
        th = lh | uh
    return tl.reshape(s, [R, 2**L])


@triton.jit
def _router_bwd_fixed_kernel(
    G, IDX, DX, DY, ACC, FLG,
    T, K, N, LOGK, num_tiles,
    stride_gt, stride_gk, stride_it, stride_ik,
    stride_dxt, stride_dyt,
    TILE_T: tl.constexpr, NP: tl.constexpr, KB: tl.constexpr, LKB: tl.constexpr,
    RUNS: tl.constexpr,
):
    """dx, dy as ``_router_bwd_kernel`` computes them, summed in 64-bit fixed point.

    Grid: (P,) persistent programs; program p handles tiles p, p + P, ... of TILE_T
    tokens; tile lane l owns int64 rows ACC[p*TILE_T + l, 0:NP] (dx) and [NP:2NP] (dy)
    and int32 flag rows FLG of the same shape.  Per token, a first pass finds m, the
    largest finite |g|, and the scale 2^s with s = 61 - LOGK - e (m < 2^e, LOGK =
    ceil(log2 K)), so that every term trunc(g * 2^s) and every sum of K of them fits in
    int64.  The second pass adds each pair's term into its x row and y row with integer
    atomics (associative: the sum is the same in every order, so the result is bitwise
    deterministic); a non-finite g sets a flag instead (+inf 1, -inf 2, NaN 4).  Each
    row is then converted once: sum * 2^-s in float64, rounded to float32, then to the
    output dtype; a flagged row gives NaN (NaN, or both infinities), else its infinity.
    Bytes: reads T*K*(2b + 4), writes 2*T*N*b; the atomics stay in L2.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    _, ax_acc, ay_acc = _lane_rows(ACC, TILE_T, NP)
    _, ax_flg, ay_flg = _lane_rows(FLG, TILE_T, NP)
    cols = tl.arange(0, NP)[None, :]
    local = tl.arange(0, KB)[None, :]
    for tile in range(loop_bound(pid), loop_bound(num_tiles), loop_bound(nprog)):
        rows64, row_ok, g_rows = _tile_rows(tile, T, G, stride_gt, TILE_T)
        i_rows = IDX + rows64 * stride_it
        # The previous tile's rows have been read by every thread.
        tl.debug_barrier()
        _zero_rows(ax_acc, ay_acc, cols, TILE_T, NP, tl.int64)
        _zero_rows(ax_flg, ay_flg, cols, TILE_T, NP, tl.int32)
        m = tl.zeros([TILE_T, KB], dtype=tl.float32)
        for r0 in range(0, loop_bound(K), KB):
            r = r0 + local
            ok = row_ok & (r < K)
            a = tl.abs(to_f32(tl.load(g_rows + r.to(tl.int64) * stride_gk, mask=ok, other=0.0)))
            m = tl.maximum(m, tl.where(a < float("inf"), a, 0.0))  # NaN < inf is false
        # m < 2^e for e = biased exponent - 126 (subnormals and 0: e = -126).
        e = (tl.max(m, axis=1).to(tl.int32, bitcast=True) >> 23) - 126
        s = (61 - LOGK - e)[:, None]
        scale = ((s + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)
        unscale = ((1023 - s).to(tl.int64) << 52).to(tl.float64, bitcast=True)
        # The zeroed rows are written before any atomic lands on them.
        tl.debug_barrier()
        for r0 in range(0, loop_bound(K), KB):
            r = r0 + local
            ok = row_ok & (r < K)
            r64 = r.to(tl.int64)
            ix = tl.load(i_rows + r64 * stride_ik, mask=ok, other=0)
            g = to_f32(tl.load(g_rows + r64 * stride_gk, mask=ok, other=0.0))
            fin = tl.abs(g) < float("inf")
            q = (tl.where(fin, g, 0.0).to(tl.float64) * scale).to(tl.int64)
            ex = ix // N
            ey = ix - ex * N
            if RUNS:
                # A run ends where the next pair (in this block) has another x row.
                prv = tl.load(i_rows + (r64 - 1) * stride_ik, mask=ok & (local > 0), other=-1)
                nxt = tl.load(i_rows + (r64 + 1) * stride_ik, mask=ok & (local < KB - 1) & (r + 1 < K),
                              other=-1)
                px = tl.where(prv >= 0, prv // N, -1)
                nx = tl.where(nxt >= 0, nxt // N, -1)
                run = _run_sums(tl.where(ok, q, 0), (px != ex).to(tl.int32), LKB)
                tl.atomic_add(ax_acc + ex, run, mask=ok & (nx != ex), sem="relaxed")
            else:
                tl.atomic_add(ax_acc + ex, q, mask=ok & fin, sem="relaxed")
            tl.atomic_add(ay_acc + ey, q, mask=ok & fin, sem="relaxed")
            code = tl.where(g != g, 4, tl.where(g > 0, 1, 2))
            tl.atomic_or(ax_flg + ex, code, mask=ok & ~fin, sem="relaxed")
            tl.atomic_or(ay_flg + ey, code, mask=ok & ~fin, sem="relaxed")
        tl.debug_barrier()
        msk = row_ok & (cols < N)
        for axis in tl.static_range(2):
            off = axis * NP
            q = tl.load(ax_acc + off + cols, cache_modifier=".cg")
            f = tl.load(ax_flg + off + cols, cache_modifier=".cg")
            v = (q.to(tl.float64) * unscale).to(tl.float32)
            bad = tl.where(((f & 4) != 0) | ((f & 3) == 3), float("nan"),
                           tl.where(f == 1, float("inf"), float("-inf")))
            v = tl.where(f == 0, v, bad)
            if axis == 0:
                tl.store(DX + rows64 * stride_dxt + cols, to_dtype(v, DX.dtype.element_ty), mask=msk)
            else:
                tl.store(DY + rows64 * stride_dyt + cols, to_dtype(v, DY.dtype.element_ty), mask=msk)


# The dense kernel up to this k: its times are measured (docs/router.md) and it is
# bitwise the sequential reference.
DENSE_MAX_K = 32
# Past the dense kernel's range: the sort kernel up to this k, the fixed-point kernel
# above (H100, T = 4096, N = 320: sort ahead by 0-6 % at k = 48-128, fixed ahead 1.3x at
# 256 and 2.6-13x at 320-4096; docs/router.md).
SORT_MAX_K = 128


def default_config(n: int, k: int = 0,
                   sm_major: int = 9) -> BackwardConfig | SortBackwardConfig | FixedBackwardConfig:
    """The rule for (N, k).  Dense kernel (measured on an H100, docs/router.md): ~32
    columns per thread and axis (C = 8 lanes per token at N = 256, 32 at N = 1024), 4
    warps, 4 pairs per loop step; columns past 1024 go to a second grid dimension so that
    the float32 tiles stay in registers.  Past ``DENSE_MAX_K``, where the dense kernel's
    compares outnumber a sort's by the model below (dense ~ next_pow2(N) * k per token and
    axis, sort ~ k * L (L + 1) / 2 with L = log2 of the sort width; the boundary is not
    measured), the sort kernel up to ``SORT_MAX_K`` and the fixed-point kernel above it
    (measured, H100)."""
    np_ = triton.next_power_of_2(max(1, n))
    if k > DENSE_MAX_K:
        kb = min(triton.next_power_of_2(k), SortBackwardConfig.block)
        lg = kb.bit_length() - 1
        if lg * (lg + 1) < np_:
            # Triton's interpreter pays per operation, not per element: wide tiles.
            if k > SORT_MAX_K:
                return FixedBackwardConfig(tile_t=16) if sm_major == 0 else FixedBackwardConfig()
            if sm_major == 0:
                return SortBackwardConfig(tile_t=16)
            return SortBackwardConfig()
    bn = min(np_, 1024)
    c = min(bn, max(8, bn // 32))
    warps = 4
    tile_t = warps * (32 // c) if c <= 32 else warps
    return BackwardConfig(bn=bn, c=c, tile_t=tile_t, unroll=4, warps=warps)


def _check_config(config) -> BackwardConfig | SortBackwardConfig:
    if isinstance(config, SortBackwardConfig):
        return with_fields(config, block=check_pow2("config.block", config.block, 2),
                           tile_t=check_pow2("config.tile_t", config.tile_t),
                           warps=check_pow2("config.warps", config.warps),
                           progs_per_sm=check_int("config.progs_per_sm", config.progs_per_sm, 1))
    if isinstance(config, FixedBackwardConfig):
        if not isinstance(config.runs, bool):
            raise TypeError(f"config.runs must be a bool, got {type(config.runs).__name__}")
        return with_fields(config, block=check_pow2("config.block", config.block),
                           tile_t=check_pow2("config.tile_t", config.tile_t),
                           warps=check_pow2("config.warps", config.warps),
                           progs_per_sm=check_int("config.progs_per_sm", config.progs_per_sm, 1))
    if not isinstance(config, BackwardConfig):
        raise TypeError(f"config must be a BackwardConfig or SortBackwardConfig, got {type(config).__name__}")
    config = with_fields(config, **{name: check_pow2(f"config.{name}", getattr(config, name))
                                    for name in ("bn", "c", "tile_t", "unroll", "warps")})
    if config.c > config.bn:
        raise ValueError(f"config.c must be <= config.bn, got c={config.c}, bn={config.bn}")
    return config


def router_backward(grad: torch.Tensor, indices: torch.Tensor, n: int, dx=None, dy=None,
                    *, config: BackwardConfig | SortBackwardConfig | None = None):
    """dx, dy (T, n) in grad's dtype from grad (T, k) and int32 indices (T, k).

    One kernel launch, no zero fill, deterministic.  ``dx``/``dy`` may be given (tests
    poison them first).  ``config`` replaces ``default_config(n, k)``: a
    ``BackwardConfig`` runs the dense kernel (bitwise the sequential reference), a
    ``SortBackwardConfig`` the sort kernel (a fixed tree order), a
    ``FixedBackwardConfig`` the fixed-point kernel (module docstring).
    """
    T, K = indices.shape
    cfg = default_config(n, K, device_info(grad.device)[1]) if config is None else _check_config(config)
    if dx is None:
        dx = torch.empty((T, n), dtype=grad.dtype, device=grad.device)
    if dy is None:
        dy = torch.empty((T, n), dtype=grad.dtype, device=grad.device)
    for name, out in (("dx", dx), ("dy", dy)):
        if out.shape != (T, n) or out.dtype != grad.dtype or (n > 1 and out.stride(1) != 1):
            raise ValueError(f"{name} must be a ({T}, {n}) {grad.dtype} tensor with unit column stride")
    if T == 0 or n == 0:
        return dx, dy
    strides = (grad.stride(0), grad.stride(1), indices.stride(0), indices.stride(1),
               dx.stride(0), dy.stride(0))
    if isinstance(cfg, SortBackwardConfig):
        np_ = max(2, triton.next_power_of_2(n))
        kb = max(2, min(triton.next_power_of_2(max(1, K)), cfg.block))
        tile_t = min(cfg.tile_t, triton.next_power_of_2(T))
        num_tiles = triton.cdiv(T, tile_t)
        programs = max(1, min(num_tiles, device_info(grad.device)[0] * cfg.progs_per_sm))
        acc = torch.empty(programs * tile_t * 2 * np_, dtype=torch.float32, device=grad.device)
        nxt = torch.empty(programs * tile_t * kb, dtype=torch.int32, device=grad.device)
        _router_bwd_sort_kernel[(programs,)](
            grad, indices, dx, dy, acc, nxt, T, K, n, num_tiles, *strides,
            TILE_T=tile_t, NP=np_, KB=kb, LKB=kb.bit_length() - 1, num_warps=cfg.warps,
        )
        return dx, dy
    if isinstance(cfg, FixedBackwardConfig):
        np_ = max(2, triton.next_power_of_2(n))
        kb = min(triton.next_power_of_2(max(1, K)), cfg.block)
        tile_t = min(cfg.tile_t, triton.next_power_of_2(T))
        num_tiles = triton.cdiv(T, tile_t)
        programs = max(1, min(num_tiles, device_info(grad.device)[0] * cfg.progs_per_sm))
        acc = torch.empty(programs * tile_t * 2 * np_, dtype=torch.int64, device=grad.device)
        flg = torch.empty(programs * tile_t * 2 * np_, dtype=torch.int32, device=grad.device)
        _router_bwd_fixed_kernel[(programs,)](
            grad, indices, dx, dy, acc, flg, T, K, n, max(0, K - 1).bit_length(), num_tiles, *strides,
            TILE_T=tile_t, NP=np_, KB=kb, LKB=kb.bit_length() - 1, RUNS=cfg.runs and kb >= 2,
            num_warps=cfg.warps,
        )
        return dx, dy
    grid = (triton.cdiv(T, cfg.tile_t), triton.cdiv(n, cfg.bn))
    _router_bwd_kernel[grid](
        grad, indices, dx, dy, T, K, *strides,
        N=n, BN=cfg.bn, C=cfg.c, TILE_T=cfg.tile_t, UNROLL=cfg.unroll, num_warps=cfg.warps,
    )
    return dx, dy
