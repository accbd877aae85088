"""Atomic experts, expert-centric: forward and backward kernels (no float atomics).

Notation: T tokens, hidden size H, E experts, k slots per token, P = T*k (token, slot)
pairs, b = bytes per element, D = distinct experts touched (~ min(E, P)).
For pair p = t*k + r with e = idx[t, r]:  a_p = u_e . h_t,  c_p = act(a_p) * w_p,
out_t = sum_r c_p v_e.

Grouping: the P flat indices are sorted (``torch.sort``, stable, int32 keys) on the
device: ``sorted_e`` (expert of each sorted position) and ``perm`` (pair id of each
sorted position).  Within one expert the pairs stay in token order, so every
expert-centric sum below runs in a fixed order: results are bitwise reproducible.
Nothing is read back to the host; every grid is sized from P, T, E or H.

Forward (two launches after the sort):
  1. ``_pair_dot_kernel`` over sorted positions: a_p = u_e . h_t, c_p = act(a_p)*w_p.
     Consecutive positions share an expert, so u_e comes from HBM once per expert and
     from L1/L2 for its other pairs.  Stores a (saved for backward) and c (T, k) fp32.
  2. ``_gather_combine_kernel`` by token: out_t = sum_r c[t, r] * v[idx[t, r]], r in
     order 0..k-1 (a deterministic per-token sum instead of float atomics).

Why not scatter out_t expert-centrically?  It needs float atomics on out (P*H atomic
adds, non-deterministic order) or a (P, H) buffer of contributions (the (T, k, H)
tensor this design avoids).  The token-centric second pass reads a v row per pair
(P*H*b) instead of per expert (D*H*b).  At the issue's sizes that costs:
  (T,H,E,k) = (4096,1024,4096,16):   v is 8 MiB, L2-resident: ~no extra HBM bytes;
  (8192,1024,65536,32):  P*H*b = 512 MiB vs D*H*b ~ 126 MiB (part hits the 50 MB L2);
  (4096,2048,2^20,16):   P ~ 1.03 D: no extra bytes.
So only the middle case pays extra, ~1.5-2x on that one pass.

Backward (three launches after ``searchsorted`` builds per-expert offsets):
  1. ``_pair_dot_kernel`` (BACKWARD) over sorted positions: g_p = v_e . do_t,
     dw_p = act(a_p) g_p, da_p = act'(a_p) w_p g_p; also c_p = act(a_p) w_p.
     v_e from HBM once per expert.  Writes dw (T, k), da by pair, and da, c and the
     token by sorted position (contiguous for step 2).
  2. ``_expert_grad_kernel``, one program per block of experts x column block:
     du_e = sum da_p h_t, dv_e = sum c_p do_t over the expert's pairs in sorted order.
     Reads no weights at all.  Writes every element of the dense (E, H) gradients
     exactly once: rows of unused experts get zeros from the same launch (no separate
     zero fill, no atomics).  The dense write, 2*E*H*b, is what autograd's dense
     parameter gradient costs; at E = 2^20, H = 2048, bf16 it is 8 GiB (~2.7 ms at
     3 TB/s) and dominates the backward.
  3. ``_gather_combine_kernel`` by token: dh_t = sum_r da[t, r] * u[idx[t, r]].

Measured (H100 80GB HBM3, triton 3.6, bf16, 2026-11-26; scripts/check_expert_gpu.py),
microseconds per launch at (T,H,E,k) = (4096,1024,4096,16) / (8192,1024,65536,32) /
(4096,2048,2^20,16):  pair dot fwd 37/139/141, gather out 23/109/111, pair dot bwd
41/151/142, expert grads 44/217/3213 (the last is the 8 GiB dense write: 2.7 TB/s;
torch.zeros_like for the same bytes took 2609), gather dh 23/109/110.

Indices outside [0, E) are masked everywhereIndices outside [0, E) are masked everywhere (they contribute nothing and receive no
gradient) and never dereferenced; the op raises on them only for CPU tensors, where
the check costs no device sync (see ``omni_moe.expert``).

Arithmetic: elementwise float32 FMA + ``tl.sum`` (IEEE float32, no tf32), whatever the
input dtypes; outputs rounded once (RNE) to their dtype via ``utils.to_dtype``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import to_dtype

ACTIVATIONS = ("silu", "gelu", "relu")
_ACT_ID = {"silu": 0, "gelu": 1, "relu": 2}


# --------------------------------------------------------------------------- helpers

@triton.jit
def _act_fwd(a, ACT: tl.constexpr):
    if ACT == 0:
        z = a * tl.sigmoid(a)
    elif ACT == 1:
        z = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    else:
        z = tl.maximum(a, 0.0)
    return z


@triton.jit
def _act_fwd_bwd(a, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(a)
        z = a * s
        dz = s * (1.0 + a * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        z = a * cdf
        dz = cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327
    else:
        z = tl.maximum(a, 0.0)
        dz = tl.where(a > 0.0, 1.0, 0.0)
    return z, dz


# --------------------------------------------------------------------------- kernels

@triton.jit
def _pair_dot_kernel(
    W, X, SORTED_E, PERM, R, A,
    C_OUT, DW_OUT, DA_OUT, DA_S_OUT, C_S_OUT, T_S_OUT,
    P, E, H, K,
    stride_we, stride_wh, stride_xt, stride_xh, stride_rt, stride_rk,
    ACT: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Per sorted pair position p (expert e, token t, slot r): d_p = W[e] . X[t].

    Forward  (W = u, X = h):  writes A[pair] = d, C_OUT[pair] = act(d) * w.
    Backward (W = v, X = do): with a = A[pair]: writes DW_OUT[t, r] = act(a) d (in w's
    dtype), DA_OUT[pair] = DA_S_OUT[p] = act'(a) w d, C_S_OUT[p] = act(a) w (float32)
    and T_S_OUT[p] = t (int32): what ``_expert_grad_kernel`` reads, contiguously.
    Pairs whose expert is outside [0, E) get zeros and read nothing.

    Grid: (cdiv(P, BLOCK_P),).  Each program owns BLOCK_P consecutive sorted positions
    and loops over H in BLOCK_H columns, summing in float32.
    Bytes: W rows D*H*b from HBM (a repeated expert hits L1/L2), X rows P*H*b gathered
    (L2-resident at the issue's sizes: T*H*b <= 16 MiB), metadata ~ P*(4+8+4+b), writes
    8P (forward) or P*(16+b) (backward).
    """
    pid = tl.program_id(0)
    pos = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    in_range = pos < P
    e = tl.load(SORTED_E + pos, mask=in_range, other=-1).to(tl.int64)
    pair = tl.load(PERM + pos, mask=in_range, other=0).to(tl.int64)
    valid = in_range & (e >= 0) & (e < E)
    e = tl.where(valid, e, 0)
    t = pair // K
    r = pair - t * K
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    w_row = W + e * stride_we
    x_row = X + t * stride_xt
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        m = valid[:, None] & (cols < H)[None, :]
        wv = tl.load(w_row[:, None] + cols[None, :] * stride_wh, mask=m, other=0.0).to(tl.float32)
        xv = tl.load(x_row[:, None] + cols[None, :] * stride_xh, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(wv * xv, axis=1)
    wr = tl.load(R + t * stride_rt + r * stride_rk, mask=valid, other=0.0).to(tl.float32)
    if BACKWARD:
        a = tl.load(A + pair, mask=valid, other=0.0)
        z, dz = _act_fwd_bwd(a, ACT)
        dw = tl.where(valid, z * acc, 0.0)
        da = tl.where(valid, dz * wr * acc, 0.0)
        c = tl.where(valid, z * wr, 0.0)
        # DW_OUT is a fresh contiguous (T, K) tensor: its flat offset is the pair id.
        tl.store(DW_OUT + pair, to_dtype(dw, DW_OUT.dtype.element_ty), mask=in_range)
        tl.store(DA_OUT + pair, da, mask=in_range)
        tl.store(DA_S_OUT + pos, da, mask=in_range)
        tl.store(C_S_OUT + pos, c, mask=in_range)
        tl.store(T_S_OUT + pos, t.to(tl.int32), mask=in_range)
    else:
        c = tl.where(valid, _act_fwd(acc, ACT) * wr, 0.0)
        tl.store(A + pair, acc, mask=in_range)
        tl.store(C_OUT + pair, c, mask=in_range)


@triton.jit
def _gather_combine_kernel(
    W, IDX, COEF, OUT,
    T, E, H, K,
    stride_we, stride_wh, stride_it, stride_ik, stride_ot, stride_oh,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, UNROLL: tl.constexpr,
):
    """OUT[t, :] = sum_{r=0..K-1} COEF[t, r] * W[IDX[t, r], :]   (float32, r in order).

    COEF is a contiguous float32 (T, K) tensor.  Slots whose index is outside [0, E)
    are skipped.  Used for out (W = v, COEF = c) and dh (W = u, COEF = da).
    Grid: (cdiv(T, BLOCK_T), cdiv(H, BLOCK_H)); every OUT element written once.  The
    slot loop is unrolled UNROLL times so that several row gathers are in flight.
    Bytes: W rows P*H*b gathered (HBM unless the row is L2-resident), K*T*(4 + idx)
    metadata per column block, writes T*H*b.
    """
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < T
    col_ok = cols < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for r0 in range(0, K, UNROLL):
        for j in tl.static_range(UNROLL):
            r = r0 + j
            # (a tensor comparison: under the interpreter r and K are plain ints)
            r_ok = row_ok & ((tl.zeros((BLOCK_T,), dtype=tl.int32) + r) < K)
            e = tl.load(IDX + rows * stride_it + r * stride_ik, mask=r_ok, other=-1).to(tl.int64)
            ok = r_ok & (e >= 0) & (e < E)
            e = tl.where(ok, e, 0)
            c = tl.load(COEF + rows * K + r, mask=ok, other=0.0)
            wv = tl.load(W + e[:, None] * stride_we + cols[None, :] * stride_wh,
                         mask=ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += c[:, None] * wv
    tl.store(OUT + rows[:, None] * stride_ot + cols[None, :] * stride_oh,
             to_dtype(acc, OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _expert_grad_kernel(
    OFFSETS, TOK_S, DA_S, C_S, HID, GO, DU, DV,
    E, H,
    stride_ht, stride_hh, stride_gt, stride_gh,
    stride_due, stride_duh, stride_dve, stride_dvh,
    COMPUTE_DU: tl.constexpr, COMPUTE_DV: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, UNROLL: tl.constexpr,
):
    """du_e = sum_j DA_S[p_j] * HID[t_j],  dv_e = sum_j C_S[p_j] * GO[t_j]  over e's pairs.

    The pairs of expert e are the sorted positions p_j = OFFSETS[e] + j, j = 0..n_e-1
    (token order), with tokens t_j = TOK_S[p_j].  Each program owns a [BLOCK_E, BLOCK_H]
    tile of du and dv (BLOCK_E consecutive experts) and walks j = 0..max_e n_e - 1, each
    step gathering one row slice per expert (rows past their n_e are masked): float32
    sums in a fixed order, no atomics, no cross-thread reduction.  Unused experts get
    zero rows, so the dense (E, H) gradients are fully written by this launch.
    Grid: (cdiv(E, BLOCK_E), cdiv(H, BLOCK_H)).  The j loop is unrolled UNROLL times.
    Bytes: HID/GO rows 2*P*H*b gathered (L2-resident at the issue's sizes), metadata
    12*P per column block, 4*(E+1) offsets, writes 2*E*H*b.
    Cost of skew: a block's trip count is its busiest expert's pair count.
    """
    pid_e = tl.program_id(0)
    pid_h = tl.program_id(1)
    es = pid_e.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    e_ok = es < E
    col_ok = cols < H
    start = tl.load(OFFSETS + es, mask=e_ok, other=0)
    cnt = tl.load(OFFSETS + es + 1, mask=e_ok, other=0) - start
    n = tl.max(cnt, axis=0)
    acc_u = tl.zeros((BLOCK_E, BLOCK_H), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_E, BLOCK_H), dtype=tl.float32)
    for j0 in range(0, n, UNROLL):
        for jj in tl.static_range(UNROLL):
            ok = (j0 + jj) < cnt
            pos = start + (j0 + jj)
            t = tl.load(TOK_S + pos, mask=ok, other=0).to(tl.int64)
            m = ok[:, None] & col_ok[None, :]
            if COMPUTE_DU:
                da = tl.load(DA_S + pos, mask=ok, other=0.0)
                hv = tl.load(HID + t[:, None] * stride_ht + cols[None, :] * stride_hh,
                             mask=m, other=0.0).to(tl.float32)
                acc_u += da[:, None] * hv
            if COMPUTE_DV:
                c = tl.load(C_S + pos, mask=ok, other=0.0)
                gv = tl.load(GO + t[:, None] * stride_gt + cols[None, :] * stride_gh,
                             mask=m, other=0.0).to(tl.float32)
                acc_v += c[:, None] * gv
    out_m = e_ok[:, None] & col_ok[None, :]
    if COMPUTE_DU:
        tl.store(DU + es[:, None] * stride_due + cols[None, :] * stride_duh,
                 to_dtype(acc_u, DU.dtype.element_ty), mask=out_m)
    if COMPUTE_DV:
        tl.store(DV + es[:, None] * stride_dve + cols[None, :] * stride_dvh,
                 to_dtype(acc_v, DV.dtype.element_ty), mask=out_m)


# --------------------------------------------------------------------------- launch configs
# Small, fixed heuristics (no autotuning): all three kernels are memory/latency bound
# gathers of H-contiguous rows: tiles of 1-2K elements per operand over 4 warps, and
# BLOCK_H = 256 (512 contiguous bytes per bf16 row read).  The choices below come from
# the sweep in scripts/check_expert_gpu.py; ``CONFIG_OVERRIDE`` lets it try others.
CONFIG_OVERRIDE = {"pair_dot": None, "gather": None, "expert_grad": None}


def _pair_dot_config(P: int, H: int):
    if CONFIG_OVERRIDE["pair_dot"] is not None:
        return CONFIG_OVERRIDE["pair_dot"]
    # Measured on H100: (8, 256) was the best or within 2% of it at all three issue
    # sizes, among (4|8|16, 256), (32, 128), (4, 512), (8, 512), (2, 1024).
    block_h = max(16, min(256, triton.next_power_of_2(max(H, 1))))
    block_p = max(1, min(8, 2048 // block_h, triton.next_power_of_2(max(P, 1))))
    return block_p, block_h, 4


def _gather_config(T: int, H: int, K: int):
    if CONFIG_OVERRIDE["gather"] is not None:
        return CONFIG_OVERRIDE["gather"]
    # Measured on H100: 4 tokens x 256 columns, slot loop unrolled twice, was the best
    # or within 1% of it at all three issue sizes.
    block_h = max(16, min(256, triton.next_power_of_2(max(H, 1))))
    block_t = max(1, min(4, 1024 // block_h, triton.next_power_of_2(max(T, 1))))
    unroll = 2 if K >= 2 else 1
    return block_t, block_h, unroll, 4


def _expert_grad_config(P: int, E: int, H: int):
    if CONFIG_OVERRIDE["expert_grad"] is not None:
        return CONFIG_OVERRIDE["expert_grad"]
    # Measured on H100: 4 experts x 256 columns, pair loop unrolled twice, was the best
    # or tied of the tilings tried at all three issue sizes (every tiling gives the same
    # bits: each expert's pairs are summed one at a time in sorted order).
    block_h = max(16, min(256, triton.next_power_of_2(max(H, 1))))
    block_e = max(1, min(4, 1024 // block_h, triton.next_power_of_2(max(E, 1))))
    return block_e, block_h, 2, 4


# --------------------------------------------------------------------------- launchers

def group_pairs(indices: torch.Tensor, num_experts: int):
    """Sort the T*k pairs by expert on the device: (sorted_e int32, perm int64).

    int64 indices are clamped to [-1, E] first so that the int32 sort keys keep every
    out-of-range index out of range.  Stable, so pairs of one expert keep token order.
    """
    flat = indices.reshape(-1)
    if flat.dtype != torch.int32:
        flat = flat.clamp(-1, num_experts).to(torch.int32)
    sorted_e, perm = torch.sort(flat, stable=True)
    return sorted_e, perm


def expert_offsets(sorted_e: torch.Tensor, num_experts: int) -> torch.Tensor:
    """offsets[e] = first sorted position with expert >= e, for e in [0, E]; int32."""
    bounds = torch.arange(num_experts + 1, dtype=sorted_e.dtype, device=sorted_e.device)
    return torch.searchsorted(sorted_e, bounds, out_int32=True)


def launch_pair_dot(weights, x, sorted_e, perm, routing_weights, a, act, backward=False,
                    c=None, dw=None, da=None, da_sorted=None, c_sorted=None, tok_sorted=None):
    """Launch ``_pair_dot_kernel``; outputs must be preallocated (see kernel)."""
    P = sorted_e.numel()
    T, H = x.shape
    K = routing_weights.shape[1]
    if P == 0:
        return
    block_p, block_h, warps = _pair_dot_config(P, H)
    dummy = a
    _pair_dot_kernel[(triton.cdiv(P, block_p),)](
        weights, x, sorted_e, perm, routing_weights, a,
        c if c is not None else dummy, dw if dw is not None else dummy,
        da if da is not None else dummy, da_sorted if da_sorted is not None else dummy,
        c_sorted if c_sorted is not None else dummy,
        tok_sorted if tok_sorted is not None else dummy,
        P, weights.shape[0], H, K,
        weights.stride(0), weights.stride(1), x.stride(0), x.stride(1),
        routing_weights.stride(0), routing_weights.stride(1),
        ACT=_ACT_ID[act], BACKWARD=backward, BLOCK_P=block_p, BLOCK_H=block_h, num_warps=warps,
    )


def launch_gather_combine(weights, indices, coef, out):
    """out[t] = sum_r coef[t, r] * weights[indices[t, r]]; coef contiguous float32 (T, K)."""
    T, K = indices.shape
    H = out.shape[1]
    if T == 0 or H == 0:
        return out
    if K == 0:
        return out.zero_()
    block_t, block_h, unroll, warps = _gather_config(T, H, K)
    grid = (triton.cdiv(T, block_t), triton.cdiv(H, block_h))
    _gather_combine_kernel[grid](
        weights, indices, coef, out, T, weights.shape[0], H, K,
        weights.stride(0), weights.stride(1), indices.stride(0), indices.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_T=block_t, BLOCK_H=block_h, UNROLL=unroll, num_warps=warps,
    )
    return out


def launch_expert_grads(offsets, tok_sorted, da_sorted, c_sorted, hidden_states, grad_out, dup, ddown):
    """Dense du/dv (either may be None: not computed); every row written."""
    E = offsets.numel() - 1
    H = hidden_states.shape[1]
    if E == 0 or H == 0 or (dup is None and ddown is None):
        return
    block_e, block_h, unroll, warps = _expert_grad_config(tok_sorted.numel(), E, H)
    du = dup if dup is not None else ddown
    dv = ddown if ddown is not None else dup
    grid = (triton.cdiv(E, block_e), triton.cdiv(H, block_h))
    _expert_grad_kernel[grid](
        offsets, tok_sorted, da_sorted, c_sorted, hidden_states, grad_out, du, dv, E, H,
        hidden_states.stride(0), hidden_states.stride(1), grad_out.stride(0), grad_out.stride(1),
        du.stride(0), du.stride(1), dv.stride(0), dv.stride(1),
        COMPUTE_DU=dup is not None, COMPUTE_DV=ddown is not None,
        BLOCK_E=block_e, BLOCK_H=block_h, UNROLL=unroll, num_warps=warps,
    )


def expert_forward(hidden_states, up_weights, down_weights, routing_weights, indices, act="silu",
                   out=None, a=None):
    """Forward: (out (T, H) in hidden dtype, a (T, k) float32, sorted_e, perm).

    ``out``/``a`` may be preallocated (tests poison them first).  No host sync.
    """
    T, H = hidden_states.shape
    K = indices.shape[1]
    E = up_weights.shape[0]
    dev = hidden_states.device
    if out is None:
        out = torch.empty((T, H), dtype=hidden_states.dtype, device=dev)
    if a is None:
        a = torch.empty((T, K), dtype=torch.float32, device=dev)
    sorted_e, perm = group_pairs(indices, E)
    c = torch.empty((T, K), dtype=torch.float32, device=dev)
    launch_pair_dot(up_weights, hidden_states, sorted_e, perm, routing_weights, a, act, c=c)
    launch_gather_combine(down_weights, indices, c, out)
    return out, a, sorted_e, perm


def expert_backward(grad_out, hidden_states, up_weights, down_weights, routing_weights, indices,
                    a, sorted_e, perm, act="silu", need_dh=True, need_dup=True, need_ddown=True,
                    dh=None, dup=None, ddown=None, dw=None):
    """Backward: (dh, dup, ddown, dw); an output not needed comes back as None.

    dup/ddown are dense (E, H) in the weights' dtypes, every row written by
    ``_expert_grad_kernel`` (zeros for unused experts).  dw is (T, k) in
    routing_weights' dtype.  Outputs may be preallocated.  No host sync.
    """
    T, H = hidden_states.shape
    K = indices.shape[1]
    E = up_weights.shape[0]
    dev = hidden_states.device
    if dh is None and need_dh:
        dh = torch.empty((T, H), dtype=hidden_states.dtype, device=dev)
    if dup is None and need_dup:
        dup = torch.empty((E, H), dtype=up_weights.dtype, device=dev)
    if ddown is None and need_ddown:
        ddown = torch.empty((E, H), dtype=down_weights.dtype, device=dev)
    if dw is None:
        dw = torch.empty((T, K), dtype=routing_weights.dtype, device=dev)
    P = T * K
    da = torch.empty((T, K), dtype=torch.float32, device=dev)
    da_sorted = torch.empty((P,), dtype=torch.float32, device=dev)
    c_sorted = torch.empty((P,), dtype=torch.float32, device=dev)
    tok_sorted = torch.empty((P,), dtype=torch.int32, device=dev)
    launch_pair_dot(down_weights, grad_out, sorted_e, perm, routing_weights, a, act, backward=True,
                    dw=dw, da=da, da_sorted=da_sorted, c_sorted=c_sorted, tok_sorted=tok_sorted)
    if need_dup or need_ddown:
        offsets = expert_offsets(sorted_e, E)
        launch_expert_grads(offsets, tok_sorted, da_sorted, c_sorted, hidden_states, grad_out,
                            dup if need_dup else None, ddown if need_ddown else None)
    if need_dh:
        launch_gather_combine(up_weights, indices, da, dh)
    return (dh if need_dh else None, dup if need_dup else None,
            ddown if need_ddown else None, dw)


# --------------------------------------------------------------------------- cost model

def expected_distinct_experts(T: int, k: int, E: int) -> float:
    """Expected number of distinct experts among T*k uniform draws from E."""
    if E <= 0:
        return 0.0
    return E * -math.expm1(T * k * math.log1p(-1.0 / E)) if E > 1 else float(min(1, T * k))


def expert_floor_bytes(T: int, H: int, E: int, k: int, dtype_bytes: int = 2, distinct=None,
                       backward: bool = False, dense_weight_grads: bool = True) -> float:
    """Fewest HBM bytes the atomic-expert op must move (the floor of the cost model).

    Forward: each touched expert's u and v rows once (2*D*H*b), h read and out written
    once (2*T*H*b), indices (4 B) and routing weights (b) once.
    ``backward=True`` returns forward + backward: u and v rows again (2*D*H*b), h and
    do read, dh written (3*T*H*b), dw written (T*k*b), and the weight gradients:
    2*E*H*b for the dense (E, H) tensors autograd needs (``dense_weight_grads``), or
    2*D*H*b if only touched rows had to be written.
    ``distinct`` (D) defaults to the expectation under uniform routing.
    """
    b = dtype_bytes
    D = expected_distinct_experts(T, k, E) if distinct is None else distinct
    fwd = 2 * D * H * b + 2 * T * H * b + T * k * (4 + b)
    if not backward:
        return fwd
    grads = 2 * (E if dense_weight_grads else D) * H * b
    return fwd + 2 * D * H * b + 3 * T * H * b + T * k * (4 + 2 * b) + grads
