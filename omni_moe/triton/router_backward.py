"""Router backward: gradient rows built on chip, no atomics, no zero fill.

Shared by the full-scan and the pruned router (both return the same (scores, indices)
contract, so they have the same backward).  Two kernels, one launch each:

- ``_router_bwd_sparse_kernel`` (k <= 64): per token, sum the k gradients of equal
  row (column) indices in the order r = 0..k-1 (k^2 compares, not k*N), mark the hit
  positions in a bitmask, then write every element once: the sums at the hit
  positions, zeros elsewhere.
- ``_router_bwd_kernel`` (larger k): dense rows, each element accumulates the k
  matches in order (k*N compares).

Both accumulate in float32 in the order r = 0..k-1 -- the order of the reference's
sequential scatter-add -- so results are bitwise deterministic and equal to it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import to_dtype


@triton.jit
def _router_bwd_kernel(
    G, IDX, DX, DY,
    T, N, K,
    stride_gt, stride_gk, stride_it, stride_ik,
    stride_dxt, stride_dyt,
    TILE_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx[t,i] = sum_r g[t,r]*[idx[t,r] div N == i];  dy[t,j] = same with idx mod N.

    Grid: (cdiv(T, TILE_T), cdiv(N, BLOCK_N)).  Each program owns the columns
    [BLOCK_N*pid_n, +BLOCK_N) of the dx and dy rows of TILE_T tokens: it reads those
    tokens' k (index, gradient) pairs, accumulates in float32 registers in the fixed
    order r = 0..k-1 (bitwise deterministic), and writes each element exactly once.
    Bytes: reads T*k*(b + 4) (once per column block), writes 2*T*N*b.
    """
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_t * TILE_T + tl.arange(0, TILE_T)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    acc_x = tl.zeros((TILE_T, BLOCK_N), dtype=tl.float32)
    acc_y = tl.zeros((TILE_T, BLOCK_N), dtype=tl.float32)
    for r in range(K):
        e = tl.load(IDX + rows64 * stride_it + r * stride_ik, mask=row_ok, other=-1)
        g = tl.load(G + rows64 * stride_gt + r * stride_gk, mask=row_ok, other=0.0).to(tl.float32)
        ex = e // N
        ey = e - ex * N
        acc_x += tl.where(ex[:, None] == cols[None, :], g[:, None], 0.0)
        acc_y += tl.where(ey[:, None] == cols[None, :], g[:, None], 0.0)
    mask = row_ok[:, None] & (cols[None, :] < N)
    tl.store(DX + rows64[:, None] * stride_dxt + cols[None, :],
             to_dtype(acc_x, DX.dtype.element_ty), mask=mask)
    tl.store(DY + rows64[:, None] * stride_dyt + cols[None, :],
             to_dtype(acc_y, DY.dtype.element_ty), mask=mask)


@triton.jit
def _router_bwd_sparse_kernel(
    G, IDX, DX, DY,
    T, K,
    stride_gt, stride_gk, stride_it, stride_ik,
    stride_dxt, stride_dyt,
    N: tl.constexpr, TILE_T: tl.constexpr, KP: tl.constexpr, WORDS: tl.constexpr,
):
    """dx[t,i] = sum_r g[t,r]*[idx[t,r] div N == i];  dy[t,j] = same with idx mod N.

    Grid: (cdiv(T, TILE_T),); one program owns whole dx and dy rows of TILE_T tokens.
    For each token: tot[r] = sum over q of g[q]*[i_q == i_r], accumulated in float32 in
    the order q = 0..K-1; first[r] = no q < r has i_q == i_r; a bitmask of WORDS int32
    words marks the hit columns.  Hit columns get tot of their first r, the others 0:
    every element is written exactly once.  Work per token O(K^2 + N).
    Bytes: reads T*K*(b + 4) (re-reads hit L1), writes 2*T*N*b.
    """
    pid = tl.program_id(0)
    rows = pid * TILE_T + tl.arange(0, TILE_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    r = tl.arange(0, KP)
    m2 = row_ok[:, None] & (r[None, :] < K)
    e = tl.load(IDX + rows64[:, None] * stride_it + r[None, :] * stride_ik, mask=m2, other=0)
    ex = e // N
    ey = e - ex * N
    tx = tl.zeros((TILE_T, KP), dtype=tl.float32)
    ty = tl.zeros((TILE_T, KP), dtype=tl.float32)
    dupx = tl.zeros((TILE_T, KP), dtype=tl.int32)
    dupy = tl.zeros((TILE_T, KP), dtype=tl.int32)
    wi = tl.arange(0, WORDS)[None, :]
    bx = tl.zeros((TILE_T, WORDS), dtype=tl.int32)
    by = tl.zeros((TILE_T, WORDS), dtype=tl.int32)
    for q in range(K):
        eq = tl.load(IDX + rows64 * stride_it + q * stride_ik, mask=row_ok, other=0)
        gq = tl.load(G + rows64 * stride_gt + q * stride_gk, mask=row_ok, other=0.0).to(tl.float32)
        exq = eq // N
        eyq = eq - exq * N
        hx = exq[:, None] == ex
        hy = eyq[:, None] == ey
        tx += tl.where(hx, gq[:, None], 0.0)
        ty += tl.where(hy, gq[:, None], 0.0)
        before = q < r[None, :]
        dupx = dupx | (hx & before).to(tl.int32)
        dupy = dupy | (hy & before).to(tl.int32)
        bx = bx | tl.where(wi == (exq >> 5)[:, None], 1 << (exq & 31)[:, None], 0)
        by = by | tl.where(wi == (eyq >> 5)[:, None], 1 << (eyq & 31)[:, None], 0)
    c = tl.arange(0, 32)[None, None, :]
    col = tl.arange(0, WORDS)[None, :, None] * 32 + c
    zero_ok = row_ok[:, None, None] & (col < N)
    zx = tl.zeros((TILE_T, WORDS, 32), dtype=DX.dtype.element_ty)
    tl.store(DX + rows64[:, None, None] * stride_dxt + col, zx,
             mask=zero_ok & (((bx[:, :, None] >> c) & 1) == 0))
    tl.store(DY + rows64[:, None, None] * stride_dyt + col, zx.to(DY.dtype.element_ty),
             mask=zero_ok & (((by[:, :, None] >> c) & 1) == 0))
    tl.store(DX + rows64[:, None] * stride_dxt + ex, to_dtype(tx, DX.dtype.element_ty),
             mask=m2 & (dupx == 0))
    tl.store(DY + rows64[:, None] * stride_dyt + ey, to_dtype(ty, DY.dtype.element_ty),
             mask=m2 & (dupy == 0))


SPARSE_MAX_K = 64


def _config(T: int, N: int):
    # Each thread should hold a few dozen float32 accumulators: TILE_T*BLOCK_N ~ 2-4K
    # elements over 4 warps.
    block_n = min(triton.next_power_of_2(N), 1024)
    tile_t = max(1, min(64, 4096 // block_n))
    tile_t = min(tile_t, max(1, triton.next_power_of_2(T)))
    while tile_t > 1 and triton.cdiv(T, tile_t) * triton.cdiv(N, block_n) < 264:
        tile_t //= 2  # enough programs to fill the GPU at small T
    return tile_t, block_n, 4


def router_backward(grad: torch.Tensor, indices: torch.Tensor, n: int, dx=None, dy=None):
    """Launch the backward.  ``dx``/``dy`` may be given (tests poison them first)."""
    T, K = indices.shape
    if dx is None:
        dx = torch.empty((T, n), dtype=grad.dtype, device=grad.device)
    if dy is None:
        dy = torch.empty((T, n), dtype=grad.dtype, device=grad.device)
    if T == 0:
        return dx, dy
    if K == 0:
        dx.zero_()
        dy.zero_()
        return dx, dy
    if K <= SPARSE_MAX_K:
        kp = triton.next_power_of_2(K)
        words = max(1, triton.next_power_of_2(n) // 32)
        # ~16 tokens per program (fewer for long rows), but enough programs to fill
        # the GPU at small T.
        tile_t = max(1, min(16, 4096 // max(kp * 32, words * 32)))
        while tile_t > 1 and triton.cdiv(T, tile_t) < 264:
            tile_t //= 2
        _router_bwd_sparse_kernel[(triton.cdiv(T, tile_t),)](
            grad, indices, dx, dy, T, K,
            grad.stride(0), grad.stride(1), indices.stride(0), indices.stride(1),
            dx.stride(0), dy.stride(0),
            N=n, TILE_T=tile_t, KP=kp, WORDS=words, num_warps=4,
        )
        return dx, dy
    tile_t, block_n, warps = _config(T, n)
    grid = (triton.cdiv(T, tile_t), triton.cdiv(n, block_n))
    _router_bwd_kernel[grid](
        grad, indices, dx, dy, T, n, K,
        grad.stride(0), grad.stride(1), indices.stride(0), indices.stride(1),
        dx.stride(0), dy.stride(0),
        TILE_T=tile_t, BLOCK_N=block_n, num_warps=warps,
    )
    return dx, dy


@triton.jit
def _router_bwd_rows_kernel(
    G, IDX, DX, DY,
    T, K,
    stride_gt, stride_gk, stride_it, stride_ik,
    stride_dxt, stride_dyt,
    N: tl.constexpr, NP: tl.constexpr, TILE_T: tl.constexpr, KP: tl.constexpr,
    MODE: tl.constexpr, FCMP: tl.constexpr,
):
    """dx[t,i] = sum_r g[t,r]*[idx[t,r] div N == i];  dy[t,j] = same with idx mod N.

    Grid: (cdiv(T, TILE_T),); one program builds whole dx and dy rows of TILE_T tokens as
    [TILE_T, NP] float32 tiles in registers and stores each row once (coalesced).
    MODE 0: every row element adds its matching gradients in the order r = 0..K-1.
    MODE 1/2: first tot[r] = sum of g[q] over q with the same row index as r, added in
    the order q = 0..K-1 (K^2 compares per token); then each element takes the tot of a
    pair that hits it (equal for all such pairs) -- MODE 1 with a select per pair, MODE 2
    with a [TILE_T, KP, NP] one-hot sum over first occurrences (one non-zero term).
    All modes give the sequential scatter-add's float32 sums bit for bit.
    Bytes: reads T*K*(b + 4), writes 2*T*N*b.
    """
    pid = tl.program_id(0)
    rows = pid * TILE_T + tl.arange(0, TILE_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, NP)[None, :]
    if FCMP:
        colc = cols.to(tl.float32)
    else:
        colc = cols
    if MODE == 0:
        ax = tl.zeros((TILE_T, NP), dtype=tl.float32)
        ay = tl.zeros((TILE_T, NP), dtype=tl.float32)
        for r in range(K):
            e = tl.load(IDX + rows64 * stride_it + r * stride_ik, mask=row_ok, other=0)
            g = tl.load(G + rows64 * stride_gt + r * stride_gk, mask=row_ok, other=0.0).to(tl.float32)
            ex = e // N
            ey = e - ex * N
            if FCMP:
                ex = ex.to(tl.float32)
                ey = ey.to(tl.float32)
            ax += tl.where(ex[:, None] == colc, g[:, None], 0.0)
            ay += tl.where(ey[:, None] == colc, g[:, None], 0.0)
    else:
        rr = tl.arange(0, KP)[None, :]
        m2 = row_ok[:, None] & (rr < K)
        e = tl.load(IDX + rows64[:, None] * stride_it + rr * stride_ik, mask=m2, other=0)
        ex = e // N
        ey = e - ex * N
        tx = tl.zeros((TILE_T, KP), dtype=tl.float32)
        ty = tl.zeros((TILE_T, KP), dtype=tl.float32)
        dupx = tl.zeros((TILE_T, KP), dtype=tl.int32)
        dupy = tl.zeros((TILE_T, KP), dtype=tl.int32)
        for q in range(K):
            eq = tl.load(IDX + rows64 * stride_it + q * stride_ik, mask=row_ok, other=0)
            gq = tl.load(G + rows64 * stride_gt + q * stride_gk, mask=row_ok, other=0.0).to(tl.float32)
            exq = eq // N
            eyq = eq - exq * N
            hx = exq[:, None] == ex
            hy = eyq[:, None] == ey
            tx += tl.where(hx, gq[:, None], 0.0)
            ty += tl.where(hy, gq[:, None], 0.0)
            if MODE == 2:
                dupx = dupx | (hx & (q < rr)).to(tl.int32)
                dupy = dupy | (hy & (q < rr)).to(tl.int32)
        if MODE == 1:
            ax = tl.zeros((TILE_T, NP), dtype=tl.float32)
            ay = tl.zeros((TILE_T, NP), dtype=tl.float32)
            for r in range(K):
                sel = rr == r
                exr = tl.sum(tl.where(sel, ex, 0), axis=1)
                eyr = tl.sum(tl.where(sel, ey, 0), axis=1)
                txr = tl.sum(tl.where(sel, tx, 0.0), axis=1)
                tyr = tl.sum(tl.where(sel, ty, 0.0), axis=1)
                if FCMP:
                    exr = exr.to(tl.float32)
                    eyr = eyr.to(tl.float32)
                ax = tl.where(exr[:, None] == colc, txr[:, None], ax)
                ay = tl.where(eyr[:, None] == colc, tyr[:, None], ay)
        else:
            exf = tl.where(m2 & (dupx == 0), ex, -1)
            eyf = tl.where(m2 & (dupy == 0), ey, -1)
            if FCMP:
                exf = exf.to(tl.float32)
                eyf = eyf.to(tl.float32)
            c3 = colc[:, None, :]
            ax = tl.sum(tl.where(exf[:, :, None] == c3, tx[:, :, None], 0.0), axis=1)
            ay = tl.sum(tl.where(eyf[:, :, None] == c3, ty[:, :, None], 0.0), axis=1)
    if N == NP:
        mask = row_ok[:, None] & (cols < NP)
    else:
        mask = row_ok[:, None] & (cols < N)
    tl.store(DX + rows64[:, None] * stride_dxt + cols, to_dtype(ax, DX.dtype.element_ty), mask=mask)
    tl.store(DY + rows64[:, None] * stride_dyt + cols, to_dtype(ay, DY.dtype.element_ty), mask=mask)


def rows_backward(grad, indices, n, dx=None, dy=None, *, tile_t=8, mode=1, fcmp=False, warps=4):
    """Launch ``_router_bwd_rows_kernel`` (experiment entry point)."""
    T, K = indices.shape
    if dx is None:
        dx = torch.empty((T, n), dtype=grad.dtype, device=grad.device)
    if dy is None:
        dy = torch.empty((T, n), dtype=grad.dtype, device=grad.device)
    if T == 0:
        return dx, dy
    _router_bwd_rows_kernel[(triton.cdiv(T, tile_t),)](
        grad, indices, dx, dy, T, K,
        grad.stride(0), grad.stride(1), indices.stride(0), indices.stride(1),
        dx.stride(0), dy.stride(0),
        N=n, NP=triton.next_power_of_2(n), TILE_T=tile_t, KP=triton.next_power_of_2(max(K, 1)),
        MODE=mode, FCMP=fcmp, num_warps=warps,
    )
    return dx, dy



@triton.jit
def _router_bwd_lanes_kernel(
    G, IDX, DX, DY,
    T, K,
    stride_gt, stride_gk, stride_it, stride_ik,
    stride_dxt, stride_dyt,
    N: tl.constexpr, NP: tl.constexpr, C: tl.constexpr, TILE_T: tl.constexpr,
    UNROLL: tl.constexpr,
):
    pid = tl.program_id(0)
    NG: tl.constexpr = NP // C
    j = tl.arange(0, NG)[:, None, None]
    t = tl.arange(0, TILE_T)[None, :, None]
    l = tl.arange(0, C)[None, None, :]
    col = j * C + l
    rows = pid * TILE_T + t
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    # Every lane of a token loads the same address (a broadcast within the warp), so the
    # per-pair values arrive in the tile's own layout.
    lane0 = l * 0
    pi = IDX + rows64 * stride_it + lane0
    pg = G + rows64 * stride_gt + lane0
    ax = tl.zeros((NG, TILE_T, C), dtype=tl.float32)
    ay = tl.zeros((NG, TILE_T, C), dtype=tl.float32)
    for r0 in range(0, K, UNROLL):
        for u in tl.static_range(UNROLL):
            r = r0 + u
            ok = row_ok & ((lane0 + r) < K)
            e = tl.load(pi + r * stride_ik, mask=ok, other=-1)
            g = tl.load(pg + r * stride_gk, mask=ok, other=0.0).to(tl.float32)
            ex = e // N
            ey = e - ex * N
            ax = tl.where(ex == col, ax + g, ax)
            ay = tl.where(ey == col, ay + g, ay)
    if N == NP:
        mask = row_ok & (col < NP)
    else:
        mask = row_ok & (col < N)
    tl.store(DX + rows64 * stride_dxt + col, to_dtype(ax, DX.dtype.element_ty), mask=mask)
    tl.store(DY + rows64 * stride_dyt + col, to_dtype(ay, DY.dtype.element_ty), mask=mask)


def lanes_backward(grad, indices, n, dx=None, dy=None, *, tile_t=4, c=32, unroll=1, warps=4):
    """Launch ``_router_bwd_lanes_kernel`` (experiment entry point)."""
    T, K = indices.shape
    if dx is None:
        dx = torch.empty((T, n), dtype=grad.dtype, device=grad.device)
    if dy is None:
        dy = torch.empty((T, n), dtype=grad.dtype, device=grad.device)
    if T == 0:
        return dx, dy
    np_ = triton.next_power_of_2(n)
    _router_bwd_lanes_kernel[(triton.cdiv(T, tile_t),)](
        grad, indices, dx, dy, T, K,
        grad.stride(0), grad.stride(1), indices.stride(0), indices.stride(1),
        dx.stride(0), dy.stride(0),
        N=n, NP=np_, C=min(c, np_), TILE_T=tile_t, UNROLL=unroll, num_warps=warps,
    )
    return dx, dy
