"""Router backward: gradient rows built in registers, one coalesced store, no atomics.

Shared by the full-scan and the pruned router (both return the same (scores, indices)
contract, so they have the same backward):

    dx[t, i] = sum_r g[t, r] * [indices[t, r] div N == i]
    dy[t, j] = sum_r g[t, r] * [indices[t, r] mod N == j]

One kernel, one launch, no zero fill: each program owns whole dx and dy rows (or a
column block of them) of a few tokens, adds the token's k gradients into a float32 tile
in the order r = 0..k-1 -- the order of the reference's sequential scatter-add, so the
result equals ``router_backward_reference`` bit for bit and is deterministic -- and
writes every element exactly once.

Layout (why it is fast): the tile is [NG, TILE_T, C] with element (j, t, l) = column
j*C + l of token t.  C lanes share a token, so each thread holds NG columns of one token
and the per-pair work (load the pair, split the index) is paid once per NG columns; the
pair itself is loaded by every lane of the token (a broadcast within the warp) so it
arrives in the tile's layout with no shuffle.  Per column and pair the compiler emits
one integer compare and one predicated add.  A plain [TILE_T, N] tile (Triton's default
layout puts tokens in registers and columns across lanes) paid the per-pair work once
per 2 columns and ran 2-4x slower (H100 measurements: docs/router.md, "Router
backward").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._checks import check_pow2, with_fields
from .._triton import loop_bound, to_dtype, to_f32


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


def default_config(n: int) -> BackwardConfig:
    """The rule for N, measured on an H100 (docs/router.md): ~32 columns per thread
    and axis (C = 8 lanes per token at N = 256, 32 at N = 1024), 4 warps, 4 pairs per
    loop step; columns past 1024 go to a second grid dimension so that the float32 tiles
    stay in registers."""
    np_ = triton.next_power_of_2(max(1, n))
    bn = min(np_, 1024)
    c = min(bn, max(8, bn // 32))
    warps = 4
    tile_t = warps * (32 // c) if c <= 32 else warps
    return BackwardConfig(bn=bn, c=c, tile_t=tile_t, unroll=4, warps=warps)


def _check_config(config) -> BackwardConfig:
    if not isinstance(config, BackwardConfig):
        raise TypeError(f"config must be a BackwardConfig, got {type(config).__name__}")
    config = with_fields(config, **{name: check_pow2(f"config.{name}", getattr(config, name))
                                    for name in ("bn", "c", "tile_t", "unroll", "warps")})
    if config.c > config.bn:
        raise ValueError(f"config.c must be <= config.bn, got c={config.c}, bn={config.bn}")
    return config


def router_backward(grad: torch.Tensor, indices: torch.Tensor, n: int, dx=None, dy=None,
                    *, config: BackwardConfig | None = None):
    """dx, dy (T, n) in grad's dtype from grad (T, k) and int32 indices (T, k).

    One kernel launch, no zero fill, no atomics.  ``dx``/``dy`` may be given (tests
    poison them first).  ``config`` replaces ``default_config(n)``.
    """
    cfg = default_config(n) if config is None else _check_config(config)
    T, K = indices.shape
    if dx is None:
        dx = torch.empty((T, n), dtype=grad.dtype, device=grad.device)
    if dy is None:
        dy = torch.empty((T, n), dtype=grad.dtype, device=grad.device)
    for name, out in (("dx", dx), ("dy", dy)):
        if out.shape != (T, n) or out.dtype != grad.dtype or (n > 1 and out.stride(1) != 1):
            raise ValueError(f"{name} must be a ({T}, {n}) {grad.dtype} tensor with unit column stride")
    if T == 0 or n == 0:
        return dx, dy
    grid = (triton.cdiv(T, cfg.tile_t), triton.cdiv(n, cfg.bn))
    _router_bwd_kernel[grid](
        grad, indices, dx, dy, T, K,
        grad.stride(0), grad.stride(1), indices.stride(0), indices.stride(1),
        dx.stride(0), dy.stride(0),
        N=n, BN=cfg.bn, C=cfg.c, TILE_T=cfg.tile_t, UNROLL=cfg.unroll, num_warps=cfg.warps,
    )
    return dx, dy
