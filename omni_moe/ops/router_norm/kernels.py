"""The OmniMoE router's prologue in a few launches: BatchNorm + log_softmax on both axes.

Input: the two router logit blocks side by side, X = (T, 2N) = [h W_x^T | h W_y^T] (one
GEMM of h with the stacked gate weights), in the GEMM's dtype.  Output: P = (T, 2N)
float32, P[:, :N] = log_softmax(norm(X[:, :N])) and P[:, N:] = log_softmax(norm(X[:, N:])),
each row normalised per axis.  ``norm`` is BatchNorm1d without affine, per column:

  MODE 0  none            xhat = x
  MODE 1  batch stats     xhat = (x - mean_T) / sqrt(var_T + eps)   (training; var biased)
                          and the running statistics are updated in place:
                          rm = (1 - m) rm + m mean, rv = (1 - m) rv + m var_T T/(T-1),
                          num_batches_tracked += 1   (as torch's BatchNorm with momentum m)
  MODE 2  running stats   xhat = (x - rm) / sqrt(rv + eps)          (eval)

PyTorch runs this as ~10 launches forward and ~10 backward (two casts, two BatchNorms
with their counter updates, two log_softmax, and their backward nodes); here:

  forward   MODE 1: ``_stats_partial_kernel`` (column statistics of row splits),
            ``_stats_finalize_kernel`` (combine, update running statistics),
            ``_rows_forward_kernel`` (normalise + log_softmax); MODE 0/2: the last only.
  backward  ``_rows_backward_kernel``: log_softmax backward dl = dp - softmax * sum(dp);
            MODE 0/2 write dX = dl (* rstd) directly.  MODE 1 also needs the column sums
            of dl and dl * xhat: partial sums per row block, ``_sums_finalize_kernel``,
            then ``_bn_backward_kernel``: dX = rstd (dl - mean_T(dl) - xhat mean_T(dl xhat)).

Every reduction runs in a fixed order (per-split two-pass statistics combined with
Chan's formula, then across splits by fixed tiles; partial sums likewise):
deterministic, no atomics.  All math float32; dX rounded once (RNE) to X's dtype.
Limits: N <= 4096 (a whole row of one axis in registers); the caller falls back to
PyTorch past that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._checks import check_int, check_pow2, with_fields
from .._triton import loop_bound, to_dtype, to_f32

MAX_N = 4096
MODES = {"none": 0, "batch": 1, "running": 2}


@triton.jit
def _stats_partial_kernel(X, PART, T, C, rows_per_split, stride_xt, stride_xc,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """PART[s, 0, c], PART[s, 1, c] = mean and M2 (sum of squared deviations) of X[rows, c]
    over split s's rows [s*rows_per_split, min((s+1)*rows_per_split, T)).

    Each BLOCK_R-row tile is reduced two-pass in registers and folded in with Chan's
    formula, in row order.  Grid: (cdiv(C, BLOCK_C), S).  Bytes: X read once, 8*S*C written.
    """
    pid_c = tl.program_id(0)
    s = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    r_begin = s * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, T)
    n_a = 0.0
    mean_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(loop_bound(r_begin), loop_bound(r_end), BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        m = (rows < r_end)[:, None] & col_ok[None, :]
        x = to_f32(tl.load(X + rows[:, None] * stride_xt + cols.to(tl.int64)[None, :] * stride_xc, mask=m,
                    other=0.0))
        n_b = tl.minimum(r_end - r0, BLOCK_R).to(tl.float32)
        mean_b = tl.sum(x, axis=0) / n_b
        d = tl.where(m, x - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)
        n = n_a + n_b
        delta = mean_b - mean_a
        mean_a = mean_a + delta * (n_b / n)
        m2_a = m2_a + m2_b + delta * delta * (n_a * n_b / n)
        n_a = n
    base = PART + s * 2 * C
    tl.store(base + cols, mean_a, mask=col_ok)
    tl.store(base + C + cols, m2_a, mask=col_ok)


@triton.jit
def _split_means(PART, COUNTS, s0, S, T, rows_per_split, cols, ok, C, BLOCK_S: tl.constexpr,
                 HAS_COUNTS: tl.constexpr):
    # Splits s0 .. s0 + BLOCK_S - 1: their indices, the [BLOCK_S, BLOCK_C] load mask, row
    # counts n_s (0 past S) and per-split column means (PART rows hold mean, then M2).
    # HAS_COUNTS: the row counts are read from COUNTS (splits of several processes).
    ss = s0 + tl.arange(0, BLOCK_S)
    s_ok = ss < S
    if HAS_COUNTS:
        n_s = tl.load(COUNTS + ss, mask=s_ok, other=0.0)
    else:
        n_s = tl.where(s_ok, tl.minimum(T - ss * rows_per_split, rows_per_split), 0).to(tl.float32)
    m = s_ok[:, None] & ok[None, :]
    mean_s = tl.load(PART + ss[:, None] * (2 * C) + cols[None, :], mask=m, other=0.0)
    return ss, m, n_s, mean_s


@triton.jit
def _stats_finalize_kernel(PART, STATS, RMX, RVX, NBX, RMY, RVY, NBY,
                           T, N, S, rows_per_split, momentum, eps,
                           BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                           COUNTS=None, HAS_COUNTS: tl.constexpr = False,
                           DEVICE_TOTAL: tl.constexpr = False):
    """Combine the S splits into STATS[0] = mean, STATS[1] = 1/sqrt(var + eps) (biased
    var) for the C = 2N columns, and update the running statistics of the x (columns
    < N) and y axes in place; program 0 adds 1 to both counters.
    Two passes over [BLOCK_S, BLOCK_C] tiles of the partials (fixed order):
    mean = sum_s n_s mean_s / T, then M2 = sum_s M2_s + n_s (mean_s - mean)^2.
    Grid: (cdiv(2N, BLOCK_C),).  Bytes: ~12*S*2N read, 8*2N + running stats read/written.
    HAS_COUNTS (``omni_moe.distributed``): split s has COUNTS[s] rows (float32, 0 for
    padding) and T is their total: the splits of all processes combined.
    DEVICE_TOTAL (with HAS_COUNTS): T points to that total (float32, one element), so no
    process reads it on the host; below 2 rows there is no batch variance, and STATS then
    hold the running statistics (mean, 1/sqrt(running var + eps), as MODE 2 computes
    them), which are left unchanged with their counters.
    """
    pid = tl.program_id(0)
    C = 2 * N
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, loop_bound(S), BLOCK_S):
        ss, m, n_s, mean_s = _split_means(PART, COUNTS, s0, S, T, rows_per_split, cols, ok, C, BLOCK_S, HAS_COUNTS)
        acc += tl.sum(n_s[:, None] * mean_s, axis=0)
    if DEVICE_TOTAL:
        n_tot = tl.load(T)
    else:
        n_tot = T
    mean = acc / n_tot
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, loop_bound(S), BLOCK_S):
        ss, m, n_s, mean_s = _split_means(PART, COUNTS, s0, S, T, rows_per_split, cols, ok, C, BLOCK_S, HAS_COUNTS)
        m2_s = tl.load(PART + ss[:, None] * (2 * C) + C + cols[None, :], mask=m, other=0.0)
        d = mean_s - mean[None, :]
        m2 += tl.sum(m2_s + n_s[:, None] * d * d, axis=0)
    var = m2 / n_tot
    rstd = 1.0 / tl.sqrt(var + eps)
    unbiased = m2 / (n_tot - 1)
    is_x = ok & (cols < N)
    is_y = ok & (cols >= N)
    cy = cols - N
    rm0 = tl.where(is_x, tl.load(RMX + cols, mask=is_x, other=0.0), tl.load(RMY + cy, mask=is_y, other=0.0))
    rv0 = tl.where(is_x, tl.load(RVX + cols, mask=is_x, other=0.0), tl.load(RVY + cy, mask=is_y, other=0.0))
    rm = (1.0 - momentum) * rm0 + momentum * mean
    rv = (1.0 - momentum) * rv0 + momentum * unbiased
    if DEVICE_TOTAL:
        # Selects rather than branches: the total is known on the device only.
        upd = n_tot >= 2.0
        mean = tl.where(upd, mean, rm0)
        rstd = tl.where(upd, rstd, 1.0 / tl.sqrt(rv0 + eps))
        rm = tl.where(upd, rm, rm0)
        rv = tl.where(upd, rv, rv0)
    tl.store(STATS + cols, mean, mask=ok)
    tl.store(STATS + C + cols, rstd, mask=ok)
    tl.store(RMX + cols, rm, mask=is_x)
    tl.store(RVX + cols, rv, mask=is_x)
    tl.store(RMY + cy, rm, mask=is_y)
    tl.store(RVY + cy, rv, mask=is_y)
    if pid == 0:
        if DEVICE_TOTAL:
            inc = upd.to(tl.int64)
        else:
            inc = 1
        tl.store(NBX, tl.load(NBX) + inc)
        tl.store(NBY, tl.load(NBY) + inc)


@triton.jit
def _axis_stats(STATS, RMX, RVX, RMY, RVY, ax, N, cols, col_ok, eps, MODE: tl.constexpr):
    """(mean, rstd) vectors of axis ``ax`` for MODE 1 (STATS) or MODE 2 (running)."""
    if MODE == 1:
        c = ax * N + cols
        mean = tl.load(STATS + c, mask=col_ok, other=0.0)
        rstd = tl.load(STATS + 2 * N + c, mask=col_ok, other=0.0)
    else:
        if ax == 0:
            mean = tl.load(RMX + cols, mask=col_ok, other=0.0)
            var = tl.load(RVX + cols, mask=col_ok, other=1.0)
        else:
            mean = tl.load(RMY + cols, mask=col_ok, other=0.0)
            var = tl.load(RVY + cols, mask=col_ok, other=1.0)
        rstd = 1.0 / tl.sqrt(var + eps)
    return mean, rstd


@triton.jit
def _axis_block(pid, T, N, BLOCK_R: tl.constexpr, NP: tl.constexpr):
    # Program (pid, ax) of the row kernels: axis ax (0 = x, 1 = y), its rows, the axis
    # columns 0..NP-1 (valid below N), the tile mask, and the columns' place in the
    # (T, 2N) layout.
    ax = tl.program_id(1)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, NP)
    col_ok = cols < N
    m = (rows < T)[:, None] & col_ok[None, :]
    return ax, rows, cols, col_ok, m, ax * N + cols


@triton.jit
def _rows_forward_kernel(X, STATS, RMX, RVX, RMY, RVY, OUT, T, N, stride_xt, stride_xc,
                         stride_ot, eps, MODE: tl.constexpr, BLOCK_R: tl.constexpr,
                         NP: tl.constexpr):
    """OUT[t, ax*N + j] = log_softmax_j(xhat[t, ax*N + :]) for a block of rows, one axis.

    Grid: (cdiv(T, BLOCK_R), 2).  Bytes: X read once (T*2N*b), OUT written (T*2N*4).
    """
    pid = tl.program_id(0)
    ax, rows, cols, col_ok, m, c = _axis_block(pid, T, N, BLOCK_R, NP)
    x = to_f32(tl.load(X + rows[:, None] * stride_xt + c.to(tl.int64)[None, :] * stride_xc, mask=m, other=0.0))
    if MODE != 0:
        mean, rstd = _axis_stats(STATS, RMX, RVX, RMY, RVY, ax, N, cols, col_ok, eps, MODE)
        x = (x - mean[None, :]) * rstd[None, :]
    x = tl.where(col_ok[None, :], x, float("-inf"))
    mx = tl.max(x, axis=1)
    ex = tl.where(col_ok[None, :], tl.exp(x - mx[:, None]), 0.0)
    out = x - (mx + tl.log(tl.sum(ex, axis=1)))[:, None]
    tl.store(OUT + rows[:, None] * stride_ot + c[None, :], out, mask=m)


@triton.jit
def _rows_backward_kernel(DPX, DPY, P, X, STATS, RVX, RVY, DX, DL, PART,
                          T, N, stride_dxt, stride_dxc, stride_dyt, stride_dyc, stride_pt,
                          stride_xt, stride_xc, stride_gt, eps,
                          MODE: tl.constexpr, BLOCK_R: tl.constexpr, NP: tl.constexpr):
    """log_softmax backward for a block of rows of one axis: dl = dp - exp(p) sum_j dp.

    MODE 0: DX = dl;  MODE 2: DX = dl * rstd (running);  both in DX's dtype.
    MODE 1: DL = dl (float32 (T, 2N)) and PART[pid, 0 / 1, c] = sum over the block's rows of
    dl and dl * xhat (for ``_sums_finalize_kernel``).
    Grid: (cdiv(T, BLOCK_R), 2).  Bytes: dp and P read (T*2N*(b + 4)), MODE 1 also X;
    writes T*2N*b (MODE 0/2) or T*2N*4 + partials (MODE 1).
    """
    pid = tl.program_id(0)
    ax, rows, cols, col_ok, m, c = _axis_block(pid, T, N, BLOCK_R, NP)
    if ax == 0:
        dp = tl.load(DPX + rows[:, None] * stride_dxt + cols.to(tl.int64)[None, :] * stride_dxc, mask=m, other=0.0)
    else:
        dp = tl.load(DPY + rows[:, None] * stride_dyt + cols.to(tl.int64)[None, :] * stride_dyc, mask=m, other=0.0)
    dp = to_f32(dp)
    p = tl.load(P + rows[:, None] * stride_pt + c[None, :], mask=m, other=0.0)
    q = tl.where(m, tl.exp(p), 0.0)
    dl = dp - q * tl.sum(dp, axis=1)[:, None]
    if MODE == 1:
        mean, rstd = _axis_stats(STATS, RVX, RVX, RVY, RVY, ax, N, cols, col_ok, eps, MODE)
        x = to_f32(tl.load(X + rows[:, None] * stride_xt + c.to(tl.int64)[None, :] * stride_xc, mask=m, other=0.0))
        xhat = tl.where(m, (x - mean[None, :]) * rstd[None, :], 0.0)
        tl.store(DL + rows[:, None] * (2 * N) + c[None, :], dl, mask=m)
        base = PART + pid.to(tl.int64) * 4 * N
        tl.store(base + c, tl.sum(dl, axis=0), mask=col_ok)
        tl.store(base + 2 * N + c, tl.sum(dl * xhat, axis=0), mask=col_ok)
    else:
        if MODE == 2:
            mean, rstd = _axis_stats(STATS, RVX, RVX, RVY, RVY, ax, N, cols, col_ok, eps, MODE)
            dl = dl * rstd[None, :]
        tl.store(DX + rows[:, None] * stride_gt + c[None, :], to_dtype(dl, DX.dtype.element_ty), mask=m)


@triton.jit
def _sums_finalize_kernel(PART, SUMS, NB, C, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """SUMS[q, c] = sum over row blocks b < NB of PART[b, q, c], q = 0, 1, by [BLOCK_B,
    BLOCK_C] tiles in a fixed order.  Grid: (cdiv(C, BLOCK_C),).  Bytes: 8*NB*C read."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < C
    s1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b0 in range(0, loop_bound(NB), BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        m = (bs < NB)[:, None] & ok[None, :]
        base = PART + bs[:, None] * (2 * C) + cols[None, :]
        s1 += tl.sum(tl.load(base, mask=m, other=0.0), axis=0)
        s2 += tl.sum(tl.load(base + C, mask=m, other=0.0), axis=0)
    tl.store(SUMS + cols, s1, mask=ok)
    tl.store(SUMS + C + cols, s2, mask=ok)


@triton.jit
def _bn_backward_kernel(DL, X, STATS, SUMS, DX, T, C, stride_xt, stride_xc, stride_gt,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """DX = rstd * (dl - s1/T - xhat * s2/T), xhat = (X - mean) * rstd  (BatchNorm backward
    through batch statistics).  Grid: (cdiv(T, BLOCK_R), cdiv(C, BLOCK_C)).
    Bytes: DL (4) and X (b) read, DX (b) written per element."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    m = (rows < T)[:, None] & col_ok[None, :]
    mean = tl.load(STATS + cols, mask=col_ok, other=0.0)
    rstd = tl.load(STATS + C + cols, mask=col_ok, other=0.0)
    inv_t = 1.0 / T
    s1 = tl.load(SUMS + cols, mask=col_ok, other=0.0) * inv_t
    s2 = tl.load(SUMS + C + cols, mask=col_ok, other=0.0) * inv_t
    dl = tl.load(DL + rows[:, None] * C + cols[None, :], mask=m, other=0.0)
    x = to_f32(tl.load(X + rows[:, None] * stride_xt + cols.to(tl.int64)[None, :] * stride_xc, mask=m, other=0.0))
    xhat = (x - mean[None, :]) * rstd[None, :]
    dx = rstd[None, :] * (dl - s1[None, :] - xhat * s2[None, :])
    tl.store(DX + rows[:, None] * stride_gt + cols[None, :], to_dtype(dx, DX.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class RouterNormConfig:
    """Launch configuration: ``splits`` row splits of the partial statistics (each
    non-empty; fewer when T is small); ``stats_tile`` (rows, columns) of the partial
    statistics kernel; ``final_tile`` (partials, columns) per step of the finalize
    kernels; ``row_block`` rows per program of the row kernels."""

    splits: int
    stats_tile: tuple[int, int] = (64, 32)
    final_tile: tuple[int, int] = (32, 64)
    row_block: int = 1


_TARGET_PROGRAMS = 512


def default_config(T: int, N: int) -> RouterNormConfig:
    """The rule: everything here is a few MB at most, so the configuration only keeps
    enough programs in flight: about 512 partial-statistics programs, row tiles of ~2K
    elements."""
    C = 2 * N
    return RouterNormConfig(splits=max(1, _TARGET_PROGRAMS // triton.cdiv(C, 32)),
                            row_block=max(1, min(16, 2048 // triton.next_power_of_2(N))))


def _check_config(config) -> RouterNormConfig:
    if not isinstance(config, RouterNormConfig):
        raise TypeError(f"config must be a RouterNormConfig, got {type(config).__name__}")
    tiles = {name: tuple(check_pow2(f"config.{name}", v) for v in getattr(config, name))
             for name in ("stats_tile", "final_tile")}
    return with_fields(config, splits=check_int("config.splits", config.splits, 1),
                       row_block=check_pow2("config.row_block", config.row_block), **tiles)


def split_rows(T: int, splits: int) -> tuple[int, int]:
    """(S, rows per split) for T rows cut into at most ``splits`` non-empty splits."""
    rows = max(1, triton.cdiv(T, min(splits, max(T, 1))))
    return triton.cdiv(T, rows), rows


def _warps(elems: int) -> int:
    return 8 if elems >= 4096 else 4


# --------------------------------------------------------------------------- launch steps
# One function per kernel launch: the single-process launchers below chain them, and the
# synchronised statistics of ``omni_moe.distributed`` put collectives between them.

def stats_partials(x, part, rows, cfg: RouterNormConfig):
    """Per-split column (mean, M2) of x (T, C) into part (S, 2, C)."""
    T, C = x.shape
    br, bc = cfg.stats_tile
    _stats_partial_kernel[(triton.cdiv(C, bc), part.shape[0])](
        x, part, T, C, rows, x.stride(0), x.stride(1), BLOCK_R=br, BLOCK_C=bc, num_warps=4)


def stats_finalize(part, stats, running, total, n, rows, momentum, eps, cfg: RouterNormConfig,
                   counts=None):
    """Combine the partials (S, 2, C) into stats (2, C) = (mean, rstd) and update the
    running statistics; ``counts`` (S,) float32 gives each split's rows (splits of
    several processes), else split s has min(rows, total - s*rows).

    ``total``: the row count, an int (>= 2), or with ``counts`` a float32 tensor of one
    element on the device (their sum, read by the kernel: no host sync); a tensor total
    below 2 leaves the running statistics as they are and puts them in ``stats``."""
    device_total = isinstance(total, torch.Tensor)
    if device_total and (counts is None or total.dtype != torch.float32 or total.numel() != 1):
        raise ValueError("total as a tensor must be one float32 element, given with counts")
    C = stats.shape[1]
    fs, fc = cfg.final_tile
    rmx, rvx, nbx, rmy, rvy, nby = running
    _stats_finalize_kernel[(triton.cdiv(C, fc),)](
        part, stats, rmx, rvx, nbx, rmy, rvy, nby, total, n, part.shape[0], rows,
        float(momentum), float(eps), BLOCK_S=fs, BLOCK_C=fc,
        COUNTS=counts, HAS_COUNTS=counts is not None, DEVICE_TOTAL=device_total, num_warps=4)


def rows_forward(x, stats, running, out, n, mode: int, eps, cfg: RouterNormConfig):
    """Normalise (MODE 1: with stats; 2: with the running statistics) and log_softmax."""
    T = x.shape[0]
    rmx, rvx, _, rmy, rvy, _ = running if running is not None else (out,) * 6
    np_ = triton.next_power_of_2(n)
    br = cfg.row_block
    _rows_forward_kernel[(triton.cdiv(T, br), 2)](
        x, stats if mode == 1 else out, rmx, rvx, rmy, rvy, out, T, n, x.stride(0), x.stride(1),
        out.stride(0), float(eps), MODE=mode, BLOCK_R=br, NP=np_, num_warps=_warps(br * np_))


def rows_backward(dpx, dpy, p, x, stats, rv, dx, dl, part, n, mode: int, eps, cfg: RouterNormConfig):
    """log_softmax backward; MODE 0/2 write dX, MODE 1 writes dl and per-block partial
    sums of dl and dl * xhat into part (cdiv(T, row_block), 2, C)."""
    T = x.shape[0]
    rvx, rvy = rv if rv is not None else (p, p)
    np_ = triton.next_power_of_2(n)
    br = cfg.row_block
    _rows_backward_kernel[(triton.cdiv(T, br), 2)](
        dpx, dpy, p, x, stats if mode == 1 else p, rvx, rvy, dx, dl, part,
        T, n, dpx.stride(0), dpx.stride(1), dpy.stride(0), dpy.stride(1), p.stride(0),
        x.stride(0), x.stride(1), dx.stride(0), float(eps),
        MODE=mode, BLOCK_R=br, NP=np_, num_warps=_warps(br * np_))


def sums_finalize(part, sums, cfg: RouterNormConfig):
    """Column sums (2, C) of the row blocks' partial sums part (B, 2, C)."""
    C = sums.shape[1]
    fs, fc = cfg.final_tile
    _sums_finalize_kernel[(triton.cdiv(C, fc),)](part, sums, part.shape[0], C, BLOCK_B=fs,
                                                  BLOCK_C=fc, num_warps=4)


def bn_backward(dl, x, stats, sums, dx):
    """dX = rstd (dl - sums[0] / T - xhat sums[1] / T) (BatchNorm backward, batch stats)."""
    T, C = x.shape
    bc = min(128, triton.next_power_of_2(C))
    brr = max(1, 2048 // bc)
    _bn_backward_kernel[(triton.cdiv(T, brr), triton.cdiv(C, bc))](
        dl, x, stats, sums, dx, T, C, x.stride(0), x.stride(1), dx.stride(0),
        BLOCK_R=brr, BLOCK_C=bc, num_warps=4)


# --------------------------------------------------------------------------- launchers

def norm_log_softmax_forward(x, n, mode, running=None, momentum=0.1, eps=1e-5, out=None, *,
                             config: RouterNormConfig | None = None):
    """(P, stats): P (T, 2N) float32 log-probabilities of both axes; ``stats`` (2, 2N)
    float32 batch mean / rstd for MODE 1 (what the backward needs), else an empty tensor.

    x: (T, 2N) logits, any strides.  mode: "none", "batch" or "running".  running: the
    six buffers (rm_x, rv_x, nbt_x, rm_y, rv_y, nbt_y) (float32 (N,) contiguous, int64
    counters) for "batch" (updated in place) and "running" (read).  "batch" needs T >= 2.
    ``config`` replaces ``default_config(T, n)``.
    """
    T, C = x.shape
    assert C == 2 * n and n <= MAX_N
    cfg = default_config(T, n) if config is None else _check_config(config)
    md = MODES[mode]
    dev = x.device
    if out is None:
        out = torch.empty((T, C), dtype=torch.float32, device=dev)
    stats = torch.empty((2, C) if md == 1 else (0,), dtype=torch.float32, device=dev)
    if T == 0:
        return out, stats
    if md == 1:
        assert T >= 2
        S, rows = split_rows(T, cfg.splits)
        part = torch.empty((S, 2, C), dtype=torch.float32, device=dev)
        stats_partials(x, part, rows, cfg)
        stats_finalize(part, stats, running, T, n, rows, momentum, eps, cfg)
    rows_forward(x, stats, running, out, n, md, eps, cfg)
    return out, stats


def norm_log_softmax_backward(dpx, dpy, p, x, stats, n, mode, running=None, eps=1e-5, dx=None, *,
                              config: RouterNormConfig | None = None):
    """dX (T, 2N) in x's dtype, row-major, from the gradients dpx, dpy (T, N) (any strides)
    of P's two halves.  ``p``, ``x``, ``stats``: the forward's output, input and stats."""
    T, C = x.shape
    cfg = default_config(T, n) if config is None else _check_config(config)
    md = MODES[mode]
    dev = x.device
    if dx is None:
        dx = torch.empty((T, C), dtype=x.dtype, device=dev)
    if T == 0:
        return dx
    rv = (running[1], running[4]) if running is not None else None
    if md == 1:
        dl = torch.empty((T, C), dtype=torch.float32, device=dev)
        part = torch.empty((triton.cdiv(T, cfg.row_block), 2, C), dtype=torch.float32, device=dev)
    else:
        dl = part = p
    rows_backward(dpx, dpy, p, x, stats, rv, dx, dl, part, n, md, eps, cfg)
    if md == 1:
        sums = torch.empty((2, C), dtype=torch.float32, device=dev)
        sums_finalize(part, sums, cfg)
        bn_backward(dl, x, stats, sums, dx)
    return dx
