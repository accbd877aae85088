"""Router backward: dense gradient rows built on chip, no atomics, no zero fill.

Shared by the full-scan and the pruned router (both return the same (scores, indices)
contract, so they have the same backward).
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


def _config(T: int, N: int):
    # Each thread should hold a few dozen float32 accumulators: TILE_T*BLOCK_N ~ 2-4K
    # elements over 4 warps.
    block_n = min(triton.next_power_of_2(N), 1024)
    tile_t = max(1, min(64, 4096 // block_n))
    tile_t = min(tile_t, max(1, triton.next_power_of_2(T)))
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
    tile_t, block_n, warps = _config(T, n)
    grid = (triton.cdiv(T, tile_t), triton.cdiv(n, block_n))
    _router_bwd_kernel[grid](
        grad, indices, dx, dy, T, n, K,
        grad.stride(0), grad.stride(1), indices.stride(0), indices.stride(1),
        dx.stride(0), dy.stride(0),
        TILE_T=tile_t, BLOCK_N=block_n, num_warps=warps,
    )
    return dx, dy
