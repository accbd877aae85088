"""Per-pair dot products on tensor cores, by rows of the expert grid ("rows" schedule).

The omni router's experts form an N x N grid (expert e = i * N + j) and a token's k
experts lie in a few grid rows: on random log-softmax logits at N = 320 a token touches
77 of the 320 rows at k = 512 and 215 at k = 4096 (docs/expert.md, "Large K").  Row i's
experts are N consecutive rows of the tables: one (N, H) slab.  So the products

    d_p = W[e_p] . X[t_p]        (forward: W = u, X = h;  backward: W = v, X = do)

of every pair p whose expert lies in row i are entries of the dense product
X[tokens of row i] @ W[row i]^T, which tensor cores compute: T * R * N * H * 2 flops
(R rows per token) instead of gathering 2 * T * k rows of H elements through the SMs.
At k = 512 the tile is 2 % full, at k = 4096 6 %.

Grouping (``group_rows``, ``row_groups``, torch ops on the device, no host sync): a
stable sort of the pairs by grid row (int16 keys below 32767 rows) orders them by
(row, token, slot); a group is one (row, token), numbered in that order (``gid``), with
its first sorted position in ``gstart``.  Out-of-range experts sort into a sentinel row
past the grid and get zero outputs.

``_row_dot_kernel``: persistent programs take work items (BLOCK_T consecutive groups,
BLOCK_J grid columns).  For each grid row among the item's groups (nearly always one):
acc = X[tokens] @ W[row, columns]^T by tl.dot over H in BLOCK_H steps (16-bit inputs on
tensor cores with float32 accumulation; float32 inputs in IEEE float32), the tile goes
to the program's scratch (L2-resident: programs x BLOCK_T x BLOCK_J float32), and after
a CTA barrier each of the item's pairs in that row and column range reads its entry and
runs ``pair_epilogue``: the same per-pair outputs as the "expert" schedule's pair-dot.
Every output is written by one program in a fixed order: bitwise deterministic run to
run (not bitwise equal to the other schedules: the dot sums in another order).
Bytes per item: BLOCK_T rows of X and BLOCK_J rows of W (H each) from L2, the pairs'
metadata (~22 B each), 4 * BLOCK_T * BLOCK_J of scratch written and read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._activations import ACT_ID, act_fwd, act_fwd_bwd
from .._dispatch import device_info
from .._triton import SOFT_BF16, loop_bound, to_dtype, to_f32


@dataclass(frozen=True)
class RowTile:
    """``_row_dot_kernel``'s program shape: BLOCK_T groups (tokens of one row) x BLOCK_J
    grid columns per work item, H in BLOCK_H steps, the item's pairs BLOCK_P at a time;
    ``warps``, software-pipeline ``stages`` and persistent programs per multiprocessor."""

    block_t: int = 128
    block_j: int = 64
    block_h: int = 64
    block_p: int = 256
    warps: int = 8
    stages: int = 3
    progs_per_sm: int = 2


def grid_width(num_experts: int) -> int:
    """Grid side N: experts i * N .. i * N + N - 1 form row i (ceil(sqrt(E)))."""
    return max(1, math.isqrt(max(num_experts - 1, 0)) + 1) if num_experts > 1 else 1


def row_key_dtype(num_experts: int) -> torch.dtype:
    """dtype of ``group_rows``' sorted keys: int16 while the rows (and the sentinel row
    past them) fit, else int32."""
    return torch.int16 if grid_width(num_experts) < 2**15 - 1 else torch.int32


# --------------------------------------------------------------------------- kernels

@triton.jit
def pair_epilogue(d, pos, pair, t, r, valid, in_range, R, A, C_OUT, DW_OUT, DA_OUT,
                  DA_S_OUT, C_S_OUT, T_S_OUT, stride_rt, stride_rk, stride_dwt, stride_dwk,
                  ACT: tl.constexpr, LOG_W: tl.constexpr, BACKWARD: tl.constexpr,
                  SORTED_OUT: tl.constexpr):
    """Per-pair outputs from the dot d of pair ``pair`` = t * K + r (at sorted position
    ``pos``); pairs not ``valid`` but ``in_range`` get zeros.

    Forward (d = u_e . h_t): A[pair] = d, C_OUT[pair] = act(d) * w.
    Backward (d = v_e . do_t, a = A[pair]): DW_OUT[t, r] = act(a) d (times w with LOG_W,
    in DW_OUT's dtype), DA_OUT[pair] = act'(a) w d and, with SORTED_OUT, DA_S_OUT[pos]
    (the same), C_S_OUT[pos] = act(a) w and T_S_OUT[pos] = t by sorted position.
    """
    wr = to_f32(tl.load(R + t * stride_rt + r * stride_rk, mask=valid, other=0.0))
    if LOG_W:
        wr = tl.where(valid, tl.exp(wr), 0.0)
    if BACKWARD:
        a = tl.load(A + pair, mask=valid, other=0.0)
        z, dz = act_fwd_bwd(a, ACT)
        dw = tl.where(valid, z * d, 0.0)
        if LOG_W:
            dw = dw * wr
        da = tl.where(valid, dz * wr * d, 0.0)
        tl.store(DW_OUT + t * stride_dwt + r * stride_dwk, to_dtype(dw, DW_OUT.dtype.element_ty),
                 mask=in_range)
        tl.store(DA_OUT + pair, da, mask=in_range)
        if SORTED_OUT:
            tl.store(DA_S_OUT + pos, da, mask=in_range)
            tl.store(C_S_OUT + pos, tl.where(valid, z * wr, 0.0), mask=in_range)
            tl.store(T_S_OUT + pos, t.to(tl.int32), mask=in_range)
    else:
        c = tl.where(valid, act_fwd(d, ACT) * wr, 0.0)
        tl.store(A + pair, tl.where(valid, d, 0.0), mask=in_range)
        tl.store(C_OUT + pair, c, mask=in_range)


@triton.jit
def _dot_acc(x, w_t, acc):
    """acc + x @ w_t, float32 accumulation: 16-bit inputs on tensor cores, anything else
    (and everything under the interpreter, which keeps bfloat16 as raw words) in IEEE
    float32."""
    if SOFT_BF16 or x.dtype != w_t.dtype or x.dtype == tl.float32:
        return tl.dot(to_f32(x), to_f32(w_t), acc, input_precision="ieee")
    else:
        return tl.dot(x, w_t, acc)


@triton.jit
def _row_dot_kernel(
    W, X, ROWS_S, PERM, GID, GSTART, NGROUPS, IDX, SCRATCH, R, A, C_OUT, DW_OUT, DA_OUT,
    E, NW, H, K, max_items,
    stride_we, stride_wh, stride_xt, stride_xh, stride_it, stride_ik,
    stride_rt, stride_rk, stride_dwt, stride_dwk,
    ACT: tl.constexpr, LOG_W: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """d_p = W[e_p] . X[t_p] for every pair, by (row groups x grid columns) tiles, then
    ``pair_epilogue`` (forward or backward outputs, by pair).

    Grid: (programs,), persistent: program pid takes items pid, pid + programs, ... below
    ``max_items`` (a bound on the groups known without a host sync); item = (tile of
    BLOCK_T groups, column block); items past the real group count return at once.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    G = tl.load(NGROUPS)
    lt = tl.arange(0, BLOCK_T)
    lj = tl.arange(0, BLOCK_J)
    scr = SCRATCH + pid.to(tl.int64) * (BLOCK_T * BLOCK_J)
    n_j = tl.cdiv(NW, BLOCK_J)
    for item in range(loop_bound(pid), loop_bound(max_items), loop_bound(nprog)):
        tile = item // n_j
        jc = item - tile * n_j
        g0 = tile * BLOCK_T
        if g0 < G:
            gs = g0 + lt
            g_ok = gs < G
            q_first = tl.load(GSTART + gs, mask=g_ok, other=0)
            tok = tl.load(PERM + q_first, mask=g_ok, other=0) // K
            g_row = tl.load(ROWS_S + q_first, mask=g_ok, other=-1).to(tl.int32)
            p_begin = tl.load(GSTART + g0)
            p_end = tl.load(GSTART + tl.minimum(g0 + BLOCK_T, G))
            r_first = tl.load(ROWS_S + p_begin).to(tl.int32)
            r_last = tl.minimum(tl.load(ROWS_S + p_end - 1).to(tl.int32), NW - 1)
            j0 = jc * BLOCK_J
            js = j0 + lj
            if jc == 0:
                # Pairs of the sentinel row (expert out of range): zero outputs.
                for qs in range(loop_bound(p_begin), loop_bound(p_end), BLOCK_P):
                    q = qs + tl.arange(0, BLOCK_P)
                    q_ok = q < p_end
                    rq = tl.load(ROWS_S + q, mask=q_ok, other=0).to(tl.int32)
                    bad = q_ok & (rq >= NW)
                    pair = tl.load(PERM + q, mask=bad, other=0)
                    t = pair // K
                    pair_epilogue(tl.zeros((BLOCK_P,), tl.float32), q, pair, t, pair - t * K,
                                  q < 0, bad, R, A, C_OUT, DW_OUT, DA_OUT, DA_OUT, DA_OUT,
                                  DA_OUT, stride_rt, stride_rk, stride_dwt, stride_dwk,
                                  ACT, LOG_W, BACKWARD, False)
            for row in range(loop_bound(r_first), loop_bound(r_last) + 1):
                sel = g_ok & (g_row == row)
                e = tl.cast(row, tl.int64) * NW + js
                e_ok = (js < NW) & (e < E)
                acc = tl.zeros((BLOCK_T, BLOCK_J), dtype=tl.float32)
                for h0 in range(0, loop_bound(H), BLOCK_H):
                    cols = h0 + tl.arange(0, BLOCK_H)
                    c_ok = cols < H
                    xv = tl.load(X + tok[:, None] * stride_xt + cols[None, :] * stride_xh,
                                 mask=sel[:, None] & c_ok[None, :], other=0.0)
                    wv = tl.load(W + e[None, :] * stride_we + cols[:, None] * stride_wh,
                                 mask=e_ok[None, :] & c_ok[:, None], other=0.0)
                    acc = _dot_acc(xv, wv, acc)
                tl.store(scr + lt[:, None] * BLOCK_J + lj[None, :], acc)
                tl.debug_barrier()
                for qs in range(loop_bound(p_begin), loop_bound(p_end), BLOCK_P):
                    q = qs + tl.arange(0, BLOCK_P)
                    q_ok = q < p_end
                    rq = tl.load(ROWS_S + q, mask=q_ok, other=-1).to(tl.int32)
                    here = q_ok & (rq == row)
                    pair = tl.load(PERM + q, mask=here, other=0)
                    t = pair // K
                    r = pair - t * K
                    eq = tl.load(IDX + t * stride_it + r * stride_ik, mask=here, other=0).to(tl.int64)
                    jq = (eq - tl.cast(row, tl.int64) * NW).to(tl.int32)
                    mine = here & (jq >= j0) & (jq < j0 + BLOCK_J)
                    lq = tl.load(GID + q, mask=mine, other=0) - g0
                    d = tl.load(scr + lq * BLOCK_J + (jq - j0), mask=mine, other=0.0)
                    pair_epilogue(d, q, pair, t, r, mine, mine, R, A, C_OUT, DW_OUT, DA_OUT,
                                  DA_OUT, DA_OUT, DA_OUT, stride_rt, stride_rk, stride_dwt,
                                  stride_dwk, ACT, LOG_W, BACKWARD, False)
                # The next row or item overwrites the scratch tile.
                tl.debug_barrier()


# --------------------------------------------------------------------------- launchers

def group_rows(indices: torch.Tensor, num_experts: int):
    """Sort the T*k pairs by grid row on the device: (sorted_rows, perm int64).

    Stable, so the order is (row, token, slot); experts outside [0, E) go to the
    sentinel row N (last)."""
    nw = grid_width(num_experts)
    flat = indices.reshape(-1)
    ok = (flat >= 0) & (flat < num_experts)
    rows = torch.where(ok, torch.div(flat, nw, rounding_mode="floor"), nw).to(row_key_dtype(num_experts))
    return torch.sort(rows, stable=True)


def row_groups(sorted_rows: torch.Tensor, perm: torch.Tensor, k: int):
    """(gid, gstart, ngroups) of the (row, token) groups of ``group_rows``' order.

    gid (P,) int32: group of each sorted position; gstart (P + 1,) int32: first
    position of group g, P for every g at or past the group count; ngroups (1,) int32.
    No host sync."""
    P = perm.numel()
    dev = perm.device
    tok = torch.div(perm, max(k, 1), rounding_mode="floor")
    first = torch.ones(P, dtype=torch.bool, device=dev)
    if P > 1:
        first[1:] = (sorted_rows[1:] != sorted_rows[:-1]) | (tok[1:] != tok[:-1])
    gid = torch.cumsum(first, 0, dtype=torch.int32) - 1
    pos = torch.arange(P, dtype=torch.int32, device=dev)
    gstart = torch.full((P + 1,), P, dtype=torch.int32, device=dev)
    # Non-first positions all write P into slot P: the same value, any order.
    gstart.scatter_(0, torch.where(first, gid, P).long(), torch.where(first, pos, P))
    ngroups = (gid[-1:] + 1) if P else torch.zeros(1, dtype=torch.int32, device=dev)
    return gid, gstart, ngroups


def launch_row_dot(weights, x, indices, sorted_rows, perm, groups, routing_weights, a, act,
                   tile: RowTile, backward=False, c=None, dw=None, da=None, log_weights=False):
    """Launch ``_row_dot_kernel``: forward writes ``a`` and ``c`` ((T, K) float32
    contiguous), backward (``a`` read) ``dw`` (T, K) and ``da`` ((T, K) float32)."""
    P = perm.numel()
    T, H = x.shape
    K = indices.shape[1]
    E = weights.shape[0]
    if P == 0:
        return
    gid, gstart, ngroups = groups
    nw = grid_width(E)
    n_rows = triton.cdiv(E, nw)
    max_groups = min(P, T * (min(K, n_rows) + 1))
    max_items = triton.cdiv(max_groups, tile.block_t) * triton.cdiv(nw, tile.block_j)
    programs = max(1, min(max_items, device_info(x.device)[0] * tile.progs_per_sm))
    scratch = torch.empty((programs, tile.block_t * tile.block_j), dtype=torch.float32,
                          device=x.device)
    dummy = a
    dw_arg = dw if dw is not None else routing_weights
    _row_dot_kernel[(programs,)](
        weights, x, sorted_rows, perm, gid, gstart, ngroups, indices, scratch, routing_weights, a,
        c if c is not None else dummy, dw_arg, da if da is not None else dummy,
        E, nw, H, K, max_items,
        weights.stride(0), weights.stride(1), x.stride(0), x.stride(1),
        indices.stride(0), indices.stride(1), routing_weights.stride(0), routing_weights.stride(1),
        dw_arg.stride(0), dw_arg.stride(1),
        ACT=ACT_ID[act], LOG_W=bool(log_weights), BACKWARD=bool(backward),
        BLOCK_T=tile.block_t, BLOCK_J=tile.block_j, BLOCK_H=tile.block_h, BLOCK_P=tile.block_p,
        num_warps=tile.warps, num_stages=tile.stages,
    )
