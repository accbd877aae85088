"""Atomic experts: forward and backward kernels (no float atomics), in three schedules.

Notation: T tokens, hidden size H, E experts, k slots per token, P = T*k (token, slot)
pairs, b = bytes per element, D = distinct experts touched (~ min(E, P)).
For pair p = t*k + r with e = idx[t, r]:  a_p = u_e . h_t,  c_p = act(a_p) * w_p,
out_t = sum_r c_p v_e.  With ``LOG_W`` the kernels read router scores s and use
w = exp(s) (the layer's routing weights), and the weight gradient they write is
d s = w * d w: the exp and its backward cost no launch of their own.

Schedules for the per-pair dot products (``choose_mode``, from shapes only, picks one of
the first two):

"token" (default): everything per token block, one pass over the pairs each way.
  forward   ``_token_forward_kernel``: a_p = u_e . h_t and out_t = sum_r c_p v_e.
            One launch, no grouping of pairs; with few token blocks (decode batches)
            the slots in chunks, one program each, and ``_split_sum_kernel`` adding
            the chunks' float32 partial rows in order.
  backward  ``_token_backward_kernel``: g_p = v_e . do_t, dw_p = act(a_p) g_p,
            da_p = act'(a_p) w_p g_p, dh_t = sum_r da_p u_e.  Then, only if du or dv is
            wanted: ``group_pairs`` (device sort), ``expert_offsets`` and
            ``_expert_grad_kernel`` (reading the pairs through the sort permutation).
  Reads each pair's u and v rows (P*H*b per weight and direction): free when the tables
  are L2-resident or when pairs rarely share an expert (P ~ D).

"expert": the dot products by expert (sorted pairs), the sums by token.
  forward   ``group_pairs``; ``_pair_dot_kernel`` over sorted positions (u_e from HBM
            once per expert, h rows from L2): a_p and c_p; ``_gather_combine_kernel``:
            out_t = sum_r c_p v_e by token.
  backward  ``_pair_dot_kernel`` (BACKWARD): g_p = v_e . do_t (v_e once per expert),
            dw, da by pair and da, c, token by sorted position; ``_expert_grad_kernel``
            on those contiguous arrays; ``_gather_combine_kernel``: dh_t = sum_r da_p u_e.
  Chosen when the tables do not fit in L2 and experts are reused (P >= 2 D): at
  (T,H,E,k) = (8192,1024,65536,32) the token schedule moves 2 GiB of rows per step
  where this one moves ~1.3 GiB.

"rows" (``config=`` only): the "expert" schedule with the dot products a_p and g_p
  computed by grid row on tensor cores (``rows.py``); measured not to pay yet
  (docs/expert.md, "Large K").

"dense" (bfloat16 h, u, v; chosen when a token routes to >= 1/32 of the experts): the
  per-token products (a_p and out_t forward, g_p and dh_t backward) as chunked cuBLAS
  GEMMs with the coefficients in three exact bfloat16 parts (``dense.py``), T*E*H*8 flops
  a direction whatever k is; the weight gradients by sorted pairs as below, or with
  ``ExpertConfig.dense_weight_grads`` (``config=`` only, not yet measured) as GEMMs too
  (``dense.dense_weight_grads``, T*E*H*12 flops each with exact coefficients), with
  ``_expert_grad_kernel`` adding the pairs the parts cannot hold (usually none) and
  rounding.

The weight gradients (otherwise): ``_expert_grad_kernel`` writes du_e =
sum_p da_p h_t and dv_e = sum_p c_p do_t over each expert's pairs in sorted (token)
order; every row of the dense (E, H) gradients is written once (zeros for unused
experts).  2*E*H*b bytes of writes, which autograd's dense parameter gradients
require: at E = 2^20, H = 2048, bf16 that is 8 GiB (~2.7 ms at 3 TB/s) and it
dominates the backward at that size.

Per-kernel and per-op times, with the card, versions and command: docs/expert.md,
"Measured performance".

Every sum runs in a fixed order (over r = 0..k-1 by token; over the stable sort's token
order by expert): results are bitwise reproducible, with no float atomics anywhere, and
nothing is read back to the host.

Indices outside [0, E) are masked everywhere (they contribute nothing and receive no
gradient) and never dereferenced; the op raises on them only for CPU tensors, where
the check costs no device sync (see ``op.py``).

Arithmetic: elementwise float32 FMA + ``tl.sum`` (IEEE float32, no tf32), whatever the
input dtypes; outputs rounded once (RNE) to their dtype via ``_triton.to_dtype``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._activations import ACT_ID, act_fwd, act_fwd_bwd
from .._checks import check_choice, check_int, check_pow2, with_fields
from .._dispatch import device_info
from .._triton import loop_bound, to_dtype, to_f32
from .dense import PRECISIONS, dense_backward, dense_forward, dense_weight_grads
from .rows import (RowTile, grid_width, group_rows, launch_row_dot, pair_epilogue, row_groups,
                   row_key_dtype)


# --------------------------------------------------------------------------- helpers

@triton.jit
def _slot_expert(IDX, rows, row_ok, r, K, E, stride_it, stride_ik, BLOCK_T: tl.constexpr):
    """(e, ok, r_ok) of slot r for a block of tokens: e clamped to 0 where not ok."""
    # (a tensor comparison: under the interpreter r and K are plain ints)
    r_ok = row_ok & ((tl.zeros((BLOCK_T,), dtype=tl.int32) + r) < K)
    e = tl.load(IDX + rows * stride_it + tl.cast(r, tl.int64) * stride_ik, mask=r_ok, other=-1).to(tl.int64)
    ok = r_ok & (e >= 0) & (e < E)
    return tl.where(ok, e, 0), ok, r_ok


@triton.jit
def _slot(IDX, W, rows, row_ok, r, K, E, stride_it, stride_ik, stride_wt, stride_wk,
          LOG_W: tl.constexpr, BLOCK_T: tl.constexpr):
    """(e, ok, r_ok, w) of slot r for a block of tokens: e clamped to 0 where not ok."""
    e, ok, r_ok = _slot_expert(IDX, rows, row_ok, r, K, E, stride_it, stride_ik, BLOCK_T)
    w = to_f32(tl.load(W + rows * stride_wt + tl.cast(r, tl.int64) * stride_wk, mask=ok, other=0.0))
    if LOG_W:
        w = tl.where(ok, tl.exp(w), 0.0)
    return e, ok, r_ok, w


@triton.jit
def _rows_f32(P, r, cols, mask, stride_r, stride_c):
    """float32 [len(r), len(cols)] tile of P at rows r (tokens or experts), columns cols."""
    return to_f32(tl.load(P + r[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c,
                   mask=mask, other=0.0))


@triton.jit
def _store_rows(P, rows, cols, row_ok, col_ok, stride_r, stride_c, acc):
    """Round the float32 tile acc to P's dtype and store it at rows x cols."""
    tl.store(P + rows[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c,
             to_dtype(acc, P.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _slot_grads(DW, DA, rows, r, K, ok, r_ok, a, w, g, stride_dwt, stride_dwk,
                ACT: tl.constexpr, LOG_W: tl.constexpr):
    """Store DW[t, r] and DA[t, r] of one slot from a, w and g = v_e . GO[t]; returns da."""
    z, dz = act_fwd_bwd(a, ACT)
    dw = tl.where(ok, z * g, 0.0)
    if LOG_W:
        dw = dw * w
    da = tl.where(ok, dz * w * g, 0.0)
    tl.store(DW + rows * stride_dwt + tl.cast(r, tl.int64) * stride_dwk, to_dtype(dw, DW.dtype.element_ty),
             mask=r_ok)
    tl.store(DA + rows * K + r, da, mask=r_ok)
    return da


# --------------------------------------------------------------------------- kernels

@triton.jit
def _token_forward_kernel(
    HID, UP, DOWN, W, IDX, A, OUT,
    T, E, H, K, CHUNK,
    stride_ht, stride_hh, stride_ue, stride_uh, stride_ve, stride_vh,
    stride_wt, stride_wk, stride_it, stride_ik, stride_os, stride_ot, stride_oh,
    ACT: tl.constexpr, LOG_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    ONE_CHUNK: tl.constexpr, UNROLL: tl.constexpr,
):
    """a[t, r] = u_e . h_t;  OUT[s, t] = sum_{r in chunk s} act(a[t, r]) w[t, r] v_e
    (e = IDX[t, r]; chunk s = slots [s*CHUNK, min(K, (s+1)*CHUNK))).

    A is a contiguous float32 (T, K) tensor; slots with e outside [0, E) get a = 0 and
    contribute nothing.  Grid: (cdiv(T, BLOCK_T), cdiv(K, CHUNK)); program (i, s) owns
    BLOCK_T tokens and slot chunk s.  One chunk (CHUNK >= K): OUT is the output (T, H),
    stride_os unused.  Several (decode batches: few token blocks, so the slot loop --
    one dependent gather after another -- would run on a few multiprocessors): OUT is a
    float32 (S, T, H) workspace of partial sums, added by ``_split_sum_kernel``.
    ONE_CHUNK (H <= BLOCK_H): h_t stays in registers and each slot is one pass (load u_e
    and v_e, dot, accumulate).  Otherwise two phases: the chunk's a[t, r] by BLOCK_H
    column chunks, stored to A, then (after a CTA barrier, which makes A's stores visible
    to the whole program) out by column chunks.  The slot loop is unrolled UNROLL times
    so that several row gathers are in flight.
    Bytes: u and v rows 2*P*H*b gathered (HBM unless L2-resident), h read S*T*H*b (again
    per slot from L1/L2 when H > BLOCK_H), idx and w P*(4 + b), writes T*H*b + 4P, or
    S*T*H*4 partial sums.
    """
    pid = tl.program_id(0)
    r_lo = tl.program_id(1) * CHUNK
    r_hi = tl.minimum(K, r_lo + CHUNK)
    OUT += tl.program_id(1).to(tl.int64) * stride_os
    rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_ok = rows < T
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK_H)
        col_ok = cols < H
        hv = _rows_f32(HID, rows, cols, row_ok[:, None] & col_ok[None, :], stride_ht, stride_hh)
        acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        for r0 in range(loop_bound(r_lo), loop_bound(r_hi), UNROLL):
            for j in tl.static_range(UNROLL):
                r = r0 + j
                e, ok, r_ok, w = _slot(IDX, W, rows, row_ok, r, r_hi, E, stride_it, stride_ik,
                                       stride_wt, stride_wk, LOG_W, BLOCK_T)
                m = ok[:, None] & col_ok[None, :]
                u = _rows_f32(UP, e, cols, m, stride_ue, stride_uh)
                v = _rows_f32(DOWN, e, cols, m, stride_ve, stride_vh)
                a = tl.where(ok, tl.sum(u * hv, axis=1), 0.0)
                c = tl.where(ok, act_fwd(a, ACT) * w, 0.0)
                acc += c[:, None] * v
                tl.store(A + rows * K + r, a, mask=r_ok)
        _store_rows(OUT, rows, cols, row_ok, col_ok, stride_ot, stride_oh, acc)
    else:
        for r0 in range(loop_bound(r_lo), loop_bound(r_hi), UNROLL):
            for j in tl.static_range(UNROLL):
                r = r0 + j
                e, ok, r_ok, w = _slot(IDX, W, rows, row_ok, r, r_hi, E, stride_it, stride_ik,
                                       stride_wt, stride_wk, LOG_W, BLOCK_T)
                dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
                for h0 in range(0, loop_bound(H), BLOCK_H):
                    cols = h0 + tl.arange(0, BLOCK_H)
                    m = ok[:, None] & (cols < H)[None, :]
                    hv = _rows_f32(HID, rows, cols, m, stride_ht, stride_hh)
                    u = _rows_f32(UP, e, cols, m, stride_ue, stride_uh)
                    dot += tl.sum(u * hv, axis=1)
                tl.store(A + rows * K + r, tl.where(ok, dot, 0.0), mask=r_ok)
        tl.debug_barrier()
        for h0 in range(0, loop_bound(H), BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
            for r0 in range(loop_bound(r_lo), loop_bound(r_hi), UNROLL):
                for j in tl.static_range(UNROLL):
                    r = r0 + j
                    e, ok, r_ok, w = _slot(IDX, W, rows, row_ok, r, r_hi, E, stride_it, stride_ik,
                                           stride_wt, stride_wk, LOG_W, BLOCK_T)
                    a = tl.load(A + rows * K + r, mask=ok, other=0.0)
                    c = tl.where(ok, act_fwd(a, ACT) * w, 0.0)
                    v = _rows_f32(DOWN, e, cols, ok[:, None] & col_ok[None, :], stride_ve, stride_vh)
                    acc += c[:, None] * v
            _store_rows(OUT, rows, cols, row_ok, col_ok, stride_ot, stride_oh, acc)


@triton.jit
def _split_sum_kernel(WS, OUT, S, T, H, stride_ot, stride_oh, BLOCK_S: tl.constexpr,
                      BLOCK_H: tl.constexpr):
    """OUT[t] = sum_s WS[s, t] in float32, rounded once to OUT's dtype.  WS: contiguous
    float32 (S, T, H).  BLOCK_S partial rows a step (a fixed tl.sum tree), the steps added
    in order: independent loads in flight instead of one dependent load per row.  Grid:
    (T, cdiv(H, BLOCK_H)).  Bytes: reads S*T*H*4, writes T*H*b."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for s0 in range(0, loop_bound(S), BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        part = tl.load(WS + ((s.to(tl.int64) * T + t) * H)[:, None] + cols[None, :],
                       mask=(s < S)[:, None] & ok[None, :], other=0.0)
        acc += tl.sum(part, axis=0)
    tl.store(OUT + t * stride_ot + cols.to(tl.int64) * stride_oh, to_dtype(acc, OUT.dtype.element_ty), mask=ok)


@triton.jit
def _token_backward_kernel(
    GO, UP, DOWN, W, IDX, A, DW, DA, DH,
    T, E, H, K,
    stride_gt, stride_gh, stride_ue, stride_uh, stride_ve, stride_vh,
    stride_wt, stride_wk, stride_it, stride_ik, stride_dwt, stride_dwk, stride_dht, stride_dhh,
    ACT: tl.constexpr, LOG_W: tl.constexpr, COMPUTE_DH: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, ONE_CHUNK: tl.constexpr, UNROLL: tl.constexpr,
):
    """Per token t and slot r (e = IDX[t, r], a = A[t, r], g = v_e . GO[t]):

        DW[t, r] = act(a) g  (times w = exp(s) with LOG_W: the gradient of the score)
        DA[t, r] = act'(a) w g          (contiguous float32 (T, K), read by the expert grads)
        DH[t]    = sum_{r=0..K-1} DA[t, r] u_e          (only if COMPUTE_DH)

    Slots with e outside [0, E) get DW = DA = 0 and read no weight row.
    Grid: (cdiv(T, BLOCK_T),).  ONE_CHUNK (H <= BLOCK_H): GO[t] stays in registers and
    each slot is one pass.  Otherwise g by column chunks, DA stored, a CTA barrier, then
    DH by column chunks.  Slot loop unrolled UNROLL times.
    Bytes: v rows P*H*b and (COMPUTE_DH) u rows P*H*b gathered, GO read T*H*b, A, w, idx
    P*(8 + b), writes DW P*b, DA 4P, DH T*H*b.
    """
    pid = tl.program_id(0)
    rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_ok = rows < T
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK_H)
        col_ok = cols < H
        go = _rows_f32(GO, rows, cols, row_ok[:, None] & col_ok[None, :], stride_gt, stride_gh)
        acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        for r0 in range(0, loop_bound(K), UNROLL):
            for j in tl.static_range(UNROLL):
                r = r0 + j
                e, ok, r_ok, w = _slot(IDX, W, rows, row_ok, r, K, E, stride_it, stride_ik,
                                       stride_wt, stride_wk, LOG_W, BLOCK_T)
                m = ok[:, None] & col_ok[None, :]
                v = _rows_f32(DOWN, e, cols, m, stride_ve, stride_vh)
                if COMPUTE_DH:
                    u = _rows_f32(UP, e, cols, m, stride_ue, stride_uh)
                a = tl.load(A + rows * K + r, mask=ok, other=0.0)
                g = tl.sum(v * go, axis=1)
                da = _slot_grads(DW, DA, rows, r, K, ok, r_ok, a, w, g, stride_dwt, stride_dwk,
                                 ACT, LOG_W)
                if COMPUTE_DH:
                    acc += da[:, None] * u
        if COMPUTE_DH:
            _store_rows(DH, rows, cols, row_ok, col_ok, stride_dht, stride_dhh, acc)
    else:
        for r0 in range(0, loop_bound(K), UNROLL):
            for j in tl.static_range(UNROLL):
                r = r0 + j
                e, ok, r_ok, w = _slot(IDX, W, rows, row_ok, r, K, E, stride_it, stride_ik,
                                       stride_wt, stride_wk, LOG_W, BLOCK_T)
                g = tl.zeros((BLOCK_T,), dtype=tl.float32)
                for h0 in range(0, loop_bound(H), BLOCK_H):
                    cols = h0 + tl.arange(0, BLOCK_H)
                    m = ok[:, None] & (cols < H)[None, :]
                    go = _rows_f32(GO, rows, cols, m, stride_gt, stride_gh)
                    v = _rows_f32(DOWN, e, cols, m, stride_ve, stride_vh)
                    g += tl.sum(v * go, axis=1)
                a = tl.load(A + rows * K + r, mask=ok, other=0.0)
                da = _slot_grads(DW, DA, rows, r, K, ok, r_ok, a, w, g, stride_dwt, stride_dwk,
                                 ACT, LOG_W)
        if COMPUTE_DH:
            tl.debug_barrier()
            for h0 in range(0, loop_bound(H), BLOCK_H):
                cols = h0 + tl.arange(0, BLOCK_H)
                col_ok = cols < H
                acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
                for r0 in range(0, loop_bound(K), UNROLL):
                    for j in tl.static_range(UNROLL):
                        r = r0 + j
                        e, ok, r_ok = _slot_expert(IDX, rows, row_ok, r, K, E, stride_it,
                                                   stride_ik, BLOCK_T)
                        da = tl.load(DA + rows * K + r, mask=ok, other=0.0)
                        u = _rows_f32(UP, e, cols, ok[:, None] & col_ok[None, :], stride_ue, stride_uh)
                        acc += da[:, None] * u
                _store_rows(DH, rows, cols, row_ok, col_ok, stride_dht, stride_dhh, acc)


@triton.jit
def _pair_dot_kernel(
    W, X, SORTED_E, PERM, R, A,
    C_OUT, DW_OUT, DA_OUT, DA_S_OUT, C_S_OUT, T_S_OUT,
    P, E, H, K,
    stride_we, stride_wh, stride_xt, stride_xh, stride_rt, stride_rk, stride_dwt, stride_dwk,
    ACT: tl.constexpr, LOG_W: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Per sorted pair position p (expert e, token t, slot r): d_p = W[e] . X[t].

    Forward  (W = u, X = h):  writes A[pair] = d, C_OUT[pair] = act(d) * w.
    Backward (W = v, X = do): with a = A[pair]: writes DW_OUT[t, r] = act(a) d (times w
    with LOG_W; in DW_OUT's dtype), DA_OUT[pair] = DA_S_OUT[p] = act'(a) w d,
    C_S_OUT[p] = act(a) w (float32) and T_S_OUT[p] = t (int32): what
    ``_expert_grad_kernel`` reads, contiguously.  A, C_OUT, DA_OUT are contiguous
    float32 (T, K).  Pairs whose expert is outside [0, E) get zeros and read nothing.

    Grid: (cdiv(P, BLOCK_P),).  Each program owns BLOCK_P consecutive sorted positions
    and loops over H in BLOCK_H columns, summing in float32.
    Bytes: W rows D*H*b from HBM (a repeated expert hits L1/L2), X rows P*H*b gathered
    (L2-resident when T*H*b is), metadata ~ P*(4+8+4+b), writes 8P (forward) or
    P*(16+b) (backward).
    """
    pid = tl.program_id(0)
    pos = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    in_range = pos < P
    e = tl.load(SORTED_E + pos, mask=in_range, other=-1).to(tl.int64)
    pair = tl.load(PERM + pos, mask=in_range, other=0)  # int64: T * K can pass 2^31
    valid = in_range & (e >= 0) & (e < E)
    e = tl.where(valid, e, 0)
    t = pair // K
    r = pair - t * K
    t = t.to(tl.int64)
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    w_row = W + e * stride_we
    x_row = X + t * stride_xt
    for h0 in range(0, loop_bound(H), BLOCK_H):
        cols = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        m = valid[:, None] & (cols < H)[None, :]
        wv = to_f32(tl.load(w_row[:, None] + cols[None, :] * stride_wh, mask=m, other=0.0))
        xv = to_f32(tl.load(x_row[:, None] + cols[None, :] * stride_xh, mask=m, other=0.0))
        acc += tl.sum(wv * xv, axis=1)
    pair_epilogue(acc, pos, pair, t, r, valid, in_range, R, A, C_OUT, DW_OUT, DA_OUT, DA_S_OUT,
                  C_S_OUT, T_S_OUT, stride_rt, stride_rk, stride_dwt, stride_dwk, ACT, LOG_W,
                  BACKWARD, True)


@triton.jit
def _gather_combine_kernel(
    W, IDX, COEF, OUT, FLAG,
    T, E, H, K,
    stride_we, stride_wh, stride_it, stride_ik, stride_ot, stride_oh,
    FLAGGED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, UNROLL: tl.constexpr,
):
    """OUT[t, :] = sum_{r=0..K-1} COEF[t, r] * W[IDX[t, r], :]   (float32, r in order).

    COEF is a contiguous float32 (T, K) tensor.  Slots whose index is outside [0, E)
    are skipped.  Used for out (W = v, COEF = c) and dh (W = u, COEF = da), and with
    ``FLAGGED`` for the rows t with FLAG[t] != 0 only (the dense schedule's
    recomputed tokens; a program without such a row loops over no slot).
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
    k_end = K
    if FLAGGED:
        row_ok = row_ok & (tl.load(FLAG + rows, mask=row_ok, other=0) != 0)
        k_end = tl.where(tl.max(row_ok.to(tl.int32), axis=0) > 0, K, 0)
    for r0 in range(0, loop_bound(k_end), UNROLL):
        for j in tl.static_range(UNROLL):
            r = r0 + j
            e, ok, r_ok = _slot_expert(IDX, rows, row_ok, r, K, E, stride_it, stride_ik, BLOCK_T)
            c = tl.load(COEF + rows * K + r, mask=ok, other=0.0)
            wv = _rows_f32(W, e, cols, ok[:, None] & col_ok[None, :], stride_we, stride_wh)
            acc += c[:, None] * wv
    _store_rows(OUT, rows, cols, row_ok, col_ok, stride_ot, stride_oh, acc)


@triton.jit
def _expert_grad_kernel(
    OFFSETS, PERM, A, DA, W, HID, GO, DU, DV, ACC_U, ACC_V,
    E, H, K,
    stride_wt, stride_wk, stride_ht, stride_hh, stride_gt, stride_gh,
    stride_due, stride_duh, stride_dve, stride_dvh, stride_acc,
    experts_per_program,
    ACT: tl.constexpr, LOG_W: tl.constexpr, SORTED: tl.constexpr, COMPUTE_DU: tl.constexpr,
    COMPUTE_DV: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """du_e = sum_j da_j HID[t_j],  dv_e = sum_j c_j GO[t_j]  over expert e's pairs j.

    Expert e's pairs are the sorted positions q_j = OFFSETS[e] + j, j = 0..n_e-1 (token
    order: the sort is stable).  SORTED: PERM = t_j (int32), DA = da_j, A = c_j, all by
    sorted position (contiguous; what ``_pair_dot_kernel`` writes).  Otherwise PERM =
    the sort permutation (pair ids p_j, t_j = p_j // K), DA and A are (T, K) float32 by
    pair and c_j = act(A[p_j]) w[p_j] is recomputed.
    Each program owns ``experts_per_program`` consecutive experts (a multiple of BLOCK_E;
    by default BLOCK_E) and BLOCK_H columns, and takes them BLOCK_E at a time: [BLOCK_E,
    BLOCK_H] tiles of du and dv, walking j = 0..max_e n_e - 1, each step gathering one
    row slice per expert (rows past their n_e are masked): float32 sums in a fixed
    order, no atomics, no cross-thread reduction.  Unused experts get zero rows, so the
    dense (E, H) gradients are fully written by this launch (at E = 2^20 that 8 GiB
    write is the whole cost).  With ``ACC`` the sums start from the float32 rows
    ACC_U[e], ACC_V[e] (the dense schedule's GEMM results, ``dense.dense_weight_grads``)
    instead of zero.
    Grid: (cdiv(E, experts_per_program), cdiv(H, BLOCK_H)).  j loop unrolled UNROLL times.
    Bytes: HID/GO rows 2*P*H*b gathered (L2-resident at the benchmark sizes), metadata
    ~16*P per column block, 4*(E+1) offsets, writes 2*E*H*b.
    Cost of skew: a block's trip count is its busiest expert's pair count.
    """
    pid_e = tl.program_id(0)
    pid_h = tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    e_begin = pid_e.to(tl.int64) * experts_per_program
    e_end = tl.minimum(e_begin + experts_per_program, E)
    for e0 in range(loop_bound(e_begin), loop_bound(e_end), BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        e_ok = es < e_end
        start = tl.load(OFFSETS + es, mask=e_ok, other=0)
        cnt = tl.load(OFFSETS + es + 1, mask=e_ok, other=0) - start
        n = tl.max(cnt, axis=0)
        acc_u = tl.zeros((BLOCK_E, BLOCK_H), dtype=tl.float32)
        acc_v = tl.zeros((BLOCK_E, BLOCK_H), dtype=tl.float32)
        if ACC:
            m_acc = e_ok[:, None] & col_ok[None, :]
            if COMPUTE_DU:
                acc_u = _rows_f32(ACC_U, es, cols, m_acc, stride_acc, 1)
            if COMPUTE_DV:
                acc_v = _rows_f32(ACC_V, es, cols, m_acc, stride_acc, 1)
        for j0 in range(0, loop_bound(n), UNROLL):
            for jj in tl.static_range(UNROLL):
                ok = (j0 + jj) < cnt
                q = start + (j0 + jj)
                if SORTED:
                    t = tl.load(PERM + q, mask=ok, other=0).to(tl.int64)
                else:
                    pair = tl.load(PERM + q, mask=ok, other=0).to(tl.int64)
                    t32 = pair // K
                    t = t32.to(tl.int64)
                m = ok[:, None] & col_ok[None, :]
                if COMPUTE_DU:
                    if SORTED:
                        da = tl.load(DA + q, mask=ok, other=0.0)
                    else:
                        da = tl.load(DA + pair, mask=ok, other=0.0)
                    hv = _rows_f32(HID, t, cols, m, stride_ht, stride_hh)
                    acc_u += da[:, None] * hv
                if COMPUTE_DV:
                    if SORTED:
                        c = tl.load(A + q, mask=ok, other=0.0)
                    else:
                        a = tl.load(A + pair, mask=ok, other=0.0)
                        w = to_f32(tl.load(W + t * stride_wt + (pair - t32 * K) * stride_wk,
                                           mask=ok, other=0.0))
                        if LOG_W:
                            w = tl.exp(w)
                        c = tl.where(ok, act_fwd(a, ACT) * w, 0.0)
                    gv = _rows_f32(GO, t, cols, m, stride_gt, stride_gh)
                    acc_v += c[:, None] * gv
        if COMPUTE_DU:
            _store_rows(DU, es, cols, e_ok, col_ok, stride_due, stride_duh, acc_u)
        if COMPUTE_DV:
            _store_rows(DV, es, cols, e_ok, col_ok, stride_dve, stride_dvh, acc_v)


# --------------------------------------------------------------------------- launch configs
# Small, fixed rules (no autotuning): all kernels are memory/latency-bound gathers of
# H-contiguous rows.
_MAX_ROW = 2048
_L2_TABLES = 40 * 2**20   # u and v together below this: L2-resident on an H100 (50 MB)
SCHEDULES = ("token", "expert", "rows", "dense")


@dataclass(frozen=True)
class Tile:
    """One kernel's program shape: ``rows`` (tokens, pairs or experts) x ``cols`` (of H)
    per program, powers of two; ``unroll`` slots per loop step; ``warps``;
    ``per_program`` (expert gradients only): experts per program, 0 = ``rows``;
    ``split`` (token forward only): programs per token block, each summing one chunk of
    the k slots into a float32 partial row, the chunks then added in order."""

    rows: int
    cols: int
    unroll: int = 1
    warps: int = 4
    per_program: int = 0
    split: int = 1


@dataclass(frozen=True)
class ExpertConfig:
    """Launch configuration of the expert op: the schedule ("token": one program per
    token tile; "expert": pairs grouped by expert; "rows": the dot products by grid
    row on tensor cores, ``rows.py``; "dense": the forward as dense GEMMs, ``dense.py``)
    and each kernel's tile; ``dense_chunk``: experts per chunk of the dense forward (0:
    ``dense.dense_chunk``'s rule); ``dense_weight_grads``: the dense schedule's weight
    gradients as GEMMs too (``dense.dense_weight_grads``; else by sorted pairs).  Not yet
    measured on a GPU, so the rule leaves it off (``config=`` only)."""

    schedule: str
    token: Tile
    pair_dot: Tile
    gather: Tile
    expert_grad: Tile
    rows: RowTile = RowTile()
    dense_chunk: int = 0
    dense_weight_grads: bool = False


_DECODE_T = 64   # up to this many tokens: the token schedule (its forward in slot chunks)


# Each direction of the dense schedule does T*E*H*8 flops whatever K is; the per-pair
# gathers grow with T*K.  Measured crossover (H100, T = 4096, E = 102,400): a token
# routing to 2 % of the experts ties, 4 % is 1.4-2.2x faster (docs/expert.md, "Large K").
_DENSE_MIN_SHARE = 32


def choose_mode(T: int, H: int, E: int, K: int, itemsize: int, dtype=None) -> str:
    """"expert" when the u/v tables do not fit in L2, pairs share experts (P >= 2 D,
    D from uniform routing) and T > 64; else "token" (decode batches: the token forward
    in slot chunks beats the expert schedule's sort and per-token-block combine there).
    "dense" instead of "expert" when ``dtype`` (that of h, u and v alike) is bfloat16 and
    a token routes to at least 1/32 of the experts.  Shapes and dtype only: no data is
    read.  The measurements behind the rule: docs/expert.md, "Launch rules" and "Large
    K".  "rows" runs only when ``config=`` names it.
    """
    P = T * K
    if P == 0 or 2 * E * H * itemsize <= _L2_TABLES or T <= _DECODE_T:
        return "token"
    if P < 2 * expected_distinct_experts(T, K, E):
        return "token"
    if dtype == torch.bfloat16 and K * _DENSE_MIN_SHARE >= E:
        return "dense"
    return "expert"


_SPLIT_MIN_K = 128         # fewer slots a token: no chunks (the k <= 32 paths stay as they were)
_SPLIT_MIN_SLOTS = 8       # slots per chunk at the least
_SPLIT_MAX_SLOTS = 128     # slots per chunk at the most, while token blocks are few
_SPLIT_PROGRAMS_PER_SM = 8
_SPLIT_MAX_CHUNKS_PER_SM = 2   # chunks of one token block, per multiprocessor, at the most


def _token_split(T: int, K: int, block_t: int, sms: int) -> int:
    # Few token blocks (decode and small batches): each program walks its k slots one
    # dependent gather after another, so the call lasts k gathers while most of the GPU
    # idles.  Cut the slots into chunks -- enough for _SPLIT_PROGRAMS_PER_SM programs a
    # multiprocessor, and at most _SPLIT_MAX_SLOTS slots a chunk -- never below
    # _SPLIT_MIN_SLOTS slots a chunk nor above _SPLIT_MAX_CHUNKS_PER_SM chunks a
    # multiprocessor.  From 8 blocks a multiprocessor on: one chunk.  Measured on an H100
    # (docs/expert.md, "Decode batches"): T = 1 / 8 / 64 / 256, k = 512 and 3072,
    # 2.5 ms -> 0.05-1.0 ms.  sms = 0 (unknown device): one chunk.
    blocks = triton.cdiv(max(T, 1), block_t)
    if sms <= 0 or K < _SPLIT_MIN_K or blocks >= _SPLIT_PROGRAMS_PER_SM * sms:
        return 1
    want = max(triton.cdiv(_SPLIT_PROGRAMS_PER_SM * sms, blocks), triton.cdiv(K, _SPLIT_MAX_SLOTS))
    return max(1, min(want, K // _SPLIT_MIN_SLOTS, _SPLIT_MAX_CHUNKS_PER_SM * sms))


def _sum_width(T: int, H: int) -> int:
    # The chunk sum reads chunks x T x H float32 once: with a few tokens, 256-column
    # programs are too few to keep the loads in flight (T = 1, H = 1024: four).  Columns
    # per program so that about 256 programs run, 32 to 256 (docs/expert.md, "Decode
    # batches": T = 1, 192 chunks, 20.8 -> 13.4 us).
    width = triton.next_power_of_2(max(T * H // 256, 1))
    return max(16, min(256, triton.next_power_of_2(max(H, 1)), max(32, width)))


def _token_tile(T: int, H: int, K: int, sms: int = 0) -> Tile:
    # One token per program with its whole row, 4 warps per 1K columns, slot loop
    # unrolled twice: the fastest tiling tried (docs/expert.md, "Launch rules").
    block_h = max(16, min(_MAX_ROW, triton.next_power_of_2(max(H, 1))))
    block_t = max(1, min(16, 1024 // block_h, triton.next_power_of_2(max(T, 1))))
    return Tile(block_t, block_h, 2 if K >= 2 else 1, 4 if block_t * block_h <= 1024 else 8,
                split=_token_split(T, K, block_t, sms))


def _pair_dot_tile(P: int, H: int) -> Tile:
    # 8 pairs x 256 columns: the tilings compared are in docs/expert.md, "Launch rules".
    block_h = max(16, min(256, triton.next_power_of_2(max(H, 1))))
    block_p = max(1, min(8, 2048 // block_h, triton.next_power_of_2(max(P, 1))))
    return Tile(block_p, block_h, 1, 4)


def _gather_tile(T: int, H: int, K: int) -> Tile:
    # 4 tokens x 256 columns, slot loop unrolled twice (docs/expert.md, "Launch rules").
    block_h = max(16, min(256, triton.next_power_of_2(max(H, 1))))
    block_t = max(1, min(4, 1024 // block_h, triton.next_power_of_2(max(T, 1))))
    return Tile(block_t, block_h, 2 if K >= 2 else 1, 4)


def _expert_grad_tile(E: int, H: int) -> Tile:
    # One expert per program with up to 1024 columns: the trip count is that expert's
    # own pair count (with several experts per program it is the busiest one's, and the
    # router's routing is not uniform), and the pair metadata is read once per 1024
    # columns.  The tilings compared: docs/expert.md, "Launch rules".  Every tiling
    # gives the same bits (each expert's pairs are summed one at a time in sorted order).
    block_h = max(16, min(1024, triton.next_power_of_2(max(H, 1))))
    block_e = max(1, min(16, 1024 // block_h, triton.next_power_of_2(max(E, 1))))
    return Tile(block_e, block_h, 2, 4)


def _rows_tile(H: int, E: int) -> RowTile:
    # 128 groups x 64 columns x 64 of H, 8 warps: the fastest at k = 512 and within 5 % at
    # k = 4096 of the three tiles timed (docs/expert.md, "Large K"); narrower only where
    # the grid or H is smaller.
    block_j = max(16, min(64, triton.next_power_of_2(grid_width(E))))
    block_h = max(16, min(64, triton.next_power_of_2(max(H, 1))))
    return RowTile(block_t=128, block_j=block_j, block_h=block_h, warps=8)


def default_config(T: int, H: int, E: int, K: int, itemsize: int, sms: int = 0,
                   dtype=None) -> ExpertConfig:
    """The launch configuration the op uses for a shape (the rules above;
    docs/expert.md, "Launch rules"); ``sms``: the device's multiprocessors (0: unknown,
    the token forward then runs one program per token block); ``dtype``: that of h, u
    and v when they share one (None otherwise)."""
    return ExpertConfig(schedule=choose_mode(T, H, E, K, itemsize, dtype),
                        token=_token_tile(T, H, K, sms), pair_dot=_pair_dot_tile(T * K, H),
                        gather=_gather_tile(T, H, K), expert_grad=_expert_grad_tile(E, H),
                        rows=_rows_tile(H, E))


def _check_config(config) -> ExpertConfig:
    if not isinstance(config, ExpertConfig):
        raise TypeError(f"config must be an ExpertConfig, got {type(config).__name__}")
    check_choice("config.schedule", config.schedule, SCHEDULES)
    tiles = {}
    for name in ("token", "pair_dot", "gather", "expert_grad"):
        tile = getattr(config, name)
        if not isinstance(tile, Tile):
            raise TypeError(f"config.{name} must be a Tile, got {type(tile).__name__}")
        tile = with_fields(tile, **{f: check_pow2(f"config.{name}.{f}", getattr(tile, f))
                                    for f in ("rows", "cols", "warps")},
                           unroll=check_int(f"config.{name}.unroll", tile.unroll, 1),
                           per_program=check_int(f"config.{name}.per_program", tile.per_program, 0),
                           split=check_int(f"config.{name}.split", tile.split, 1))
        if tile.cols < 16:
            raise ValueError(f"config.{name}.cols must be >= 16, got {tile.cols}")
        tiles[name] = tile
    rt = config.rows
    if not isinstance(rt, RowTile):
        raise TypeError(f"config.rows must be a RowTile, got {type(rt).__name__}")
    fields = {f: check_pow2(f"config.rows.{f}", getattr(rt, f), 16)
              for f in ("block_t", "block_j", "block_h")}
    fields.update({f: check_pow2(f"config.rows.{f}", getattr(rt, f))
                   for f in ("block_p", "warps")})
    fields.update({f: check_int(f"config.rows.{f}", getattr(rt, f), 1)
                   for f in ("stages", "progs_per_sm")})
    tiles["rows"] = with_fields(rt, **fields)
    tiles["dense_chunk"] = check_int("config.dense_chunk", config.dense_chunk, 0)
    if not isinstance(config.dense_weight_grads, bool):
        raise TypeError(f"config.dense_weight_grads must be a bool, got "
                        f"{type(config.dense_weight_grads).__name__}")
    return with_fields(config, **tiles)


# --------------------------------------------------------------------------- launchers

def shared_dtype(*tensors):
    """The tensors' dtype when they all have the same one, else None."""
    dtype = tensors[0].dtype
    return dtype if all(t.dtype == dtype for t in tensors) else None


def sort_key_dtype(num_experts: int, schedule: str = "expert") -> torch.dtype:
    """dtype of the sorted keys the forward saves: ``group_pairs``' (int16 when E < 2^15 - 1,
    else int32) or, in the "rows" schedule, ``group_rows``'."""
    if schedule == "rows":
        return row_key_dtype(num_experts)
    return torch.int16 if num_experts < 2**15 - 1 else torch.int32


def group_pairs(indices: torch.Tensor, num_experts: int):
    """Sort the T*k pairs by expert on the device: (sorted_e, perm int64).

    Keys are int16 when E < 2^15 - 1 (half the radix passes of int32), else int32;
    int64/int32 indices are clamped to [-1, E] first so that every out-of-range index
    stays out of range.  Stable, so pairs of one expert keep token order.
    """
    flat = indices.reshape(-1)
    key = sort_key_dtype(num_experts)
    if flat.dtype != key:
        if flat.dtype != torch.int32 or key == torch.int16:
            flat = flat.clamp(-1, num_experts)
        flat = flat.to(key)
    sorted_e, perm = torch.sort(flat, stable=True)
    return sorted_e, perm


def expert_offsets(sorted_e: torch.Tensor, num_experts: int) -> torch.Tensor:
    """offsets[e] = first sorted position with expert >= e, for e in [0, E]; int32."""
    bounds = torch.arange(num_experts + 1, dtype=sorted_e.dtype, device=sorted_e.device)
    return torch.searchsorted(sorted_e, bounds, out_int32=True)


def launch_token_forward(hidden_states, up_weights, down_weights, routing_weights, indices,
                         a, out, act, log_weights, tile: Tile):
    """Launch ``_token_forward_kernel`` into preallocated ``a`` (T, K) float32
    contiguous and ``out`` (T, H); with ``tile.split`` > 1 chunks of slots go to a
    float32 workspace, then ``_split_sum_kernel`` adds them into ``out``."""
    T, H = hidden_states.shape
    K = indices.shape[1]
    if T == 0 or (H == 0 and K == 0):
        return
    if K == 0:
        out.zero_()
        return
    block_t, block_h, unroll, warps = tile.rows, tile.cols, tile.unroll, tile.warps
    chunk = triton.cdiv(K, min(tile.split, K))
    chunks = triton.cdiv(K, chunk)
    dst = out if chunks == 1 else torch.empty((chunks, T, H), dtype=torch.float32, device=out.device)
    _token_forward_kernel[(triton.cdiv(T, block_t), chunks)](
        hidden_states, up_weights, down_weights, routing_weights, indices, a, dst,
        T, up_weights.shape[0], H, K, chunk,
        hidden_states.stride(0), hidden_states.stride(1), up_weights.stride(0), up_weights.stride(1),
        down_weights.stride(0), down_weights.stride(1), routing_weights.stride(0),
        routing_weights.stride(1), indices.stride(0), indices.stride(1),
        dst.stride(0) if chunks > 1 else 0, dst.stride(-2), dst.stride(-1),
        ACT=ACT_ID[act], LOG_W=bool(log_weights), BLOCK_T=block_t, BLOCK_H=block_h,
        ONE_CHUNK=H <= block_h, UNROLL=unroll, num_warps=warps,
    )
    if chunks > 1:
        sum_h = _sum_width(T, H)
        sum_s = min(16, triton.next_power_of_2(chunks))
        _split_sum_kernel[(T, triton.cdiv(H, sum_h))](dst, out, chunks, T, H, out.stride(0), out.stride(1),
                                                      BLOCK_S=sum_s, BLOCK_H=sum_h, num_warps=4)


def launch_token_backward(grad_out, up_weights, down_weights, routing_weights, indices, a,
                          dw, da, dh, act, log_weights, tile: Tile):
    """Launch ``_token_backward_kernel``: dw (T, K), da (T, K) float32 contiguous, and dh
    (T, H) unless it is None."""
    T, K = indices.shape
    H = grad_out.shape[1]
    if T == 0 or K == 0:
        if dh is not None:
            dh.zero_()
        return
    block_t, block_h, unroll, warps = tile.rows, tile.cols, tile.unroll, tile.warps
    dh_arg = dh if dh is not None else da
    _token_backward_kernel[(triton.cdiv(T, block_t),)](
        grad_out, up_weights, down_weights, routing_weights, indices, a, dw, da, dh_arg,
        T, up_weights.shape[0], H, K,
        grad_out.stride(0), grad_out.stride(1), up_weights.stride(0), up_weights.stride(1),
        down_weights.stride(0), down_weights.stride(1), routing_weights.stride(0),
        routing_weights.stride(1), indices.stride(0), indices.stride(1), dw.stride(0), dw.stride(1),
        dh_arg.stride(0), dh_arg.stride(-1),
        ACT=ACT_ID[act], LOG_W=bool(log_weights), COMPUTE_DH=dh is not None,
        BLOCK_T=block_t, BLOCK_H=block_h, ONE_CHUNK=H <= block_h, UNROLL=unroll, num_warps=warps,
    )


def launch_pair_dot(weights, x, sorted_e, perm, routing_weights, a, act, tile: Tile,
                    backward=False, c=None, dw=None, da=None, da_sorted=None, c_sorted=None,
                    tok_sorted=None, log_weights=False):
    """Launch ``_pair_dot_kernel``; outputs must be preallocated (see kernel)."""
    P = sorted_e.numel()
    T, H = x.shape
    K = routing_weights.shape[1]
    if P == 0:
        return
    block_p, block_h, warps = tile.rows, tile.cols, tile.warps
    dummy = a
    dw_arg = dw if dw is not None else routing_weights
    _pair_dot_kernel[(triton.cdiv(P, block_p),)](
        weights, x, sorted_e, perm, routing_weights, a,
        c if c is not None else dummy, dw_arg,
        da if da is not None else dummy, da_sorted if da_sorted is not None else dummy,
        c_sorted if c_sorted is not None else dummy,
        tok_sorted if tok_sorted is not None else dummy,
        P, weights.shape[0], H, K,
        weights.stride(0), weights.stride(1), x.stride(0), x.stride(1),
        routing_weights.stride(0), routing_weights.stride(1), dw_arg.stride(0), dw_arg.stride(1),
        ACT=ACT_ID[act], LOG_W=bool(log_weights), BACKWARD=backward,
        BLOCK_P=block_p, BLOCK_H=block_h, num_warps=warps,
    )


def launch_gather_combine(weights, indices, coef, out, tile: Tile, flag=None):
    """out[t] = sum_r coef[t, r] * weights[indices[t, r]]; coef contiguous float32 (T, K).
    ``flag`` (T,) int32: only the rows t with flag[t] != 0 are written."""
    T, K = indices.shape
    H = out.shape[1]
    if T == 0 or H == 0:
        return out
    if K == 0:
        return out.zero_() if flag is None else out
    block_t, block_h, unroll, warps = tile.rows, tile.cols, tile.unroll, tile.warps
    grid = (triton.cdiv(T, block_t), triton.cdiv(H, block_h))
    _gather_combine_kernel[grid](
        weights, indices, coef, out, coef if flag is None else flag, T, weights.shape[0], H, K,
        weights.stride(0), weights.stride(1), indices.stride(0), indices.stride(1),
        out.stride(0), out.stride(1), FLAGGED=flag is not None,
        BLOCK_T=block_t, BLOCK_H=block_h, UNROLL=unroll, num_warps=warps,
    )
    return out


def launch_expert_grads(offsets, perm, a, da, routing_weights, hidden_states, grad_out, dup, ddown,
                        act, log_weights, tile: Tile, sorted_inputs=False, acc_u=None, acc_v=None):
    """Dense du/dv (either may be None: not computed); every row written.

    ``sorted_inputs``: perm, da, a are (tok_sorted, da_sorted, c_sorted) by sorted
    position; else the sort permutation and (T, K) float32 a, da by pair.  ``acc_u``,
    ``acc_v``: contiguous float32 (E, H) starting sums of du and dv (given together with
    the gradients they start)."""
    E = offsets.numel() - 1
    T, H = hidden_states.shape
    K = routing_weights.shape[1]
    if E == 0 or H == 0 or (dup is None and ddown is None):
        return
    block_e, block_h, unroll, warps = tile.rows, tile.cols, tile.unroll, tile.warps
    per = tile.per_program or block_e
    du = dup if dup is not None else ddown
    dv = ddown if ddown is not None else dup
    acc = acc_u is not None or acc_v is not None
    au = acc_u if acc_u is not None else acc_v
    av = acc_v if acc_v is not None else acc_u
    grid = (triton.cdiv(E, per), triton.cdiv(H, block_h))
    _expert_grad_kernel[grid](
        offsets, perm, a, da, routing_weights, hidden_states, grad_out, du, dv,
        au if acc else du, av if acc else dv, E, H, max(K, 1),
        routing_weights.stride(0), routing_weights.stride(1),
        hidden_states.stride(0), hidden_states.stride(1), grad_out.stride(0), grad_out.stride(1),
        du.stride(0), du.stride(1), dv.stride(0), dv.stride(1), H, per,
        ACT=ACT_ID[act], LOG_W=bool(log_weights), SORTED=bool(sorted_inputs),
        COMPUTE_DU=dup is not None, COMPUTE_DV=ddown is not None, ACC=acc,
        BLOCK_E=block_e, BLOCK_H=block_h, UNROLL=unroll, num_warps=warps,
    )


def expert_forward(hidden_states, up_weights, down_weights, routing_weights, indices, act="silu",
                   out=None, a=None, log_weights=False, *, config: ExpertConfig | None = None,
                   precision: str = "exact"):
    """Forward: (out (T, H) in hidden dtype, a (T, k) float32, sorted_e, perm).

    ``sorted_e``/``perm`` are the pairs' grouping: by expert in the "expert" schedule
    (``choose_mode``), by grid row in the "rows" one (``rows.group_rows``), empty
    tensors in the "token" one; pass them on to ``expert_backward``.  ``out``/``a`` may
    be preallocated (tests poison them first; ``a`` contiguous).  ``log_weights``: routing_weights holds scores s and the weights
    are exp(s).  No host sync.  ``config`` replaces ``default_config``'s choice.
    ``precision``: "exact" or "bfloat16" (the dense schedule's coefficients rounded to
    bfloat16, ``dense.py``; the other schedules are exact either way).
    """
    check_choice("precision", precision, tuple(PRECISIONS))
    T, H = hidden_states.shape
    K = indices.shape[1]
    E = up_weights.shape[0]
    dev = hidden_states.device
    dtype = shared_dtype(hidden_states, up_weights, down_weights)
    cfg = (default_config(T, H, E, K, up_weights.element_size(), device_info(dev)[0], dtype)
           if config is None else _check_config(config))
    if out is None:
        out = torch.empty((T, H), dtype=hidden_states.dtype, device=dev)
    if a is None:
        a = torch.empty((T, K), dtype=torch.float32, device=dev)
    schedule = cfg.schedule
    if schedule == "dense" and dtype != torch.bfloat16:
        schedule = "expert"                                 # dense.py: bfloat16 only
    if schedule == "dense":
        dense_forward(hidden_states, up_weights, down_weights, routing_weights, indices, a, out,
                      ACT_ID[act], bool(log_weights), cfg.dense_chunk,
                      lambda coef, flag, acc: launch_gather_combine(down_weights, indices, coef,
                                                                    acc, cfg.gather, flag=flag),
                      precision)
        return (out, a, indices.new_empty((0,), dtype=sort_key_dtype(E)),
                indices.new_empty((0,), dtype=torch.int64))
    if schedule == "token":
        launch_token_forward(hidden_states, up_weights, down_weights, routing_weights, indices, a,
                             out, act, log_weights, cfg.token)
        return (out, a, indices.new_empty((0,), dtype=sort_key_dtype(E)),
                indices.new_empty((0,), dtype=torch.int64))
    c = torch.empty((T, K), dtype=torch.float32, device=dev)
    if cfg.schedule == "rows":
        sorted_e, perm = group_rows(indices, E)
        launch_row_dot(up_weights, hidden_states, indices, sorted_e, perm,
                       row_groups(sorted_e, perm, K), routing_weights, a, act, cfg.rows, c=c,
                       log_weights=log_weights)
    else:
        sorted_e, perm = group_pairs(indices, E)
        launch_pair_dot(up_weights, hidden_states, sorted_e, perm, routing_weights, a, act,
                        cfg.pair_dot, c=c, log_weights=log_weights)
    launch_gather_combine(down_weights, indices, c, out, cfg.gather)
    return out, a, sorted_e, perm


def expert_backward(grad_out, hidden_states, up_weights, down_weights, routing_weights, indices,
                    a, sorted_e, perm, act="silu", need_dh=True, need_dup=True, need_ddown=True,
                    dh=None, dup=None, ddown=None, dw=None, log_weights=False, *,
                    config: ExpertConfig | None = None, used_rows=None,
                    precision: str = "exact"):
    """Backward: (dh, dup, ddown, dw); an output not needed comes back as None.

    ``sorted_e``/``perm``: what ``expert_forward`` returned (empty: the "token"
    schedule, which sorts here only if dup or ddown is needed; "rows": grouped by grid
    row, and the weight gradients sort the pairs by expert here).  dup/ddown are dense
    (E, H) in the weights' dtypes, every row written by ``_expert_grad_kernel`` (zeros
    for unused experts).  dw is (T, k) in routing_weights' dtype (with ``log_weights``:
    the gradient of the scores).  Outputs may be preallocated.  No host sync.  ``config``
    replaces ``default_config``'s; it must name the forward's schedule.  ``precision``: as
    ``expert_forward``'s (in the dense schedule, dh's coefficients da_p).

    ``used_rows``: a function ``(sorted_e, E) -> (rows (D,), offsets (D + 1,) int32)``
    grouping the sorted pairs by used expert (``sparse.expert_groups``); dup/ddown are then
    (D, H), one row per used expert, the same bits as those rows of the dense gradients,
    and a fifth result gives ``rows``.
    """
    check_choice("precision", precision, tuple(PRECISIONS))
    T, H = hidden_states.shape
    K = indices.shape[1]
    E = up_weights.shape[0]
    dev = hidden_states.device
    cfg = (default_config(T, H, E, K, up_weights.element_size(),
                          dtype=shared_dtype(hidden_states, up_weights, down_weights))
           if config is None else _check_config(config))
    if dh is None and need_dh:
        dh = torch.empty((T, H), dtype=hidden_states.dtype, device=dev)
    if used_rows is None:
        if dup is None and need_dup:
            dup = torch.empty((E, H), dtype=up_weights.dtype, device=dev)
        if ddown is None and need_ddown:
            ddown = torch.empty((E, H), dtype=down_weights.dtype, device=dev)
    if dw is None:
        dw = torch.empty((T, K), dtype=routing_weights.dtype, device=dev)
    need_w = need_dup or need_ddown
    rows = None

    def weight_grads(sorted_e, pairs, a_p, da_p, sorted_inputs):
        nonlocal dup, ddown, rows
        if used_rows is None:
            offsets = expert_offsets(sorted_e, E)
        else:
            rows, offsets = used_rows(sorted_e, E)
            D = rows.numel()
            dup = torch.empty((D, H), dtype=up_weights.dtype, device=dev) if need_dup else None
            ddown = torch.empty((D, H), dtype=down_weights.dtype, device=dev) if need_ddown else None
        launch_expert_grads(offsets, pairs, a_p, da_p, routing_weights, hidden_states, grad_out,
                            dup if need_dup else None, ddown if need_ddown else None, act,
                            log_weights, cfg.expert_grad, sorted_inputs=sorted_inputs)

    dense = cfg.schedule == "dense" and perm.numel() == 0 and T * K > 0
    if dense and shared_dtype(grad_out, hidden_states, up_weights, down_weights) != torch.bfloat16:
        sorted_e, perm = group_pairs(indices, E)            # other dtypes: "expert"'s backward
        dense = False
    da = torch.empty((T, K), dtype=torch.float32, device=dev)
    if dense:
        # The weight gradients as GEMMs need the dense (E, H) layout and the marks of
        # repeated experts, which the pairs kernel finds while it writes dh's parts.
        gemm_grads = need_w and cfg.dense_weight_grads and need_dh and used_rows is None
        repeats = dense_backward(
            grad_out, hidden_states, up_weights, down_weights, routing_weights, indices, a, dw, da,
            dh if need_dh else None, ACT_ID[act], bool(log_weights), cfg.dense_chunk,
            lambda coef, flag, acc: launch_gather_combine(up_weights, indices, coef, acc,
                                                          cfg.gather, flag=flag),
            precision, mark_repeats=gemm_grads)
        if gemm_grads and repeats is not None:
            def group(key):
                sorted_key, pairs = group_pairs(key, E)
                return pairs, expert_offsets(sorted_key, E)

            def fix(offsets, pairs, acc_u, acc_v, du, dv):
                launch_expert_grads(offsets, pairs, a, da, routing_weights, hidden_states, grad_out,
                                    du, dv, act, log_weights, cfg.expert_grad,
                                    acc_u=acc_u, acc_v=acc_v)

            dense_weight_grads(grad_out, hidden_states, routing_weights, indices, a, da, repeats,
                               dup if need_dup else None, ddown if need_ddown else None,
                               ACT_ID[act], bool(log_weights), cfg.dense_chunk,
                               sort_key_dtype(E), group, fix, precision)
        elif need_w:
            sorted_e, perm = group_pairs(indices, E)
            weight_grads(sorted_e, perm, a, da, False)
    elif perm.numel() == 0:                                 # "token" schedule
        launch_token_backward(grad_out, up_weights, down_weights, routing_weights, indices, a,
                              dw, da, dh if need_dh else None, act, log_weights, cfg.token)
        if need_w:
            sorted_e, perm = group_pairs(indices, E)
            weight_grads(sorted_e, perm, a, da, False)
    elif cfg.schedule == "rows":
        launch_row_dot(down_weights, grad_out, indices, sorted_e, perm,
                       row_groups(sorted_e, perm, K), routing_weights, a, act, cfg.rows,
                       backward=True, dw=dw, da=da, log_weights=log_weights)
        if need_w:
            sorted_e, perm = group_pairs(indices, E)
            weight_grads(sorted_e, perm, a, da, False)
        if need_dh:
            launch_gather_combine(up_weights, indices, da, dh, cfg.gather)
    else:                                                   # "expert" schedule
        P = T * K
        da_s = torch.empty((P,), dtype=torch.float32, device=dev)
        c_s = torch.empty((P,), dtype=torch.float32, device=dev)
        t_s = torch.empty((P,), dtype=torch.int32, device=dev)
        launch_pair_dot(down_weights, grad_out, sorted_e, perm, routing_weights, a, act,
                        cfg.pair_dot, backward=True, dw=dw, da=da, da_sorted=da_s, c_sorted=c_s, tok_sorted=t_s,
                        log_weights=log_weights)
        if need_w:
            weight_grads(sorted_e, t_s, c_s, da_s, True)
        if need_dh:
            launch_gather_combine(up_weights, indices, da, dh, cfg.gather)
    grads = (dh if need_dh else None, dup if need_dup else None,
             ddown if need_ddown else None, dw)
    return grads if used_rows is None else (*grads, rows)


# --------------------------------------------------------------------------- cost model

def expected_distinct_experts(T: int, k: int, E: int) -> float:
    """Expected number of distinct experts among T*k uniform draws from E."""
    if E <= 0:
        return 0.0
    return E * -math.expm1(T * k * math.log1p(-1.0 / E)) if E > 1 else float(min(1, T * k))


def expert_floor_bytes(T: int, H: int, E: int, k: int, dtype_bytes: int = 2, distinct=None,
                       backward: bool = False, dense_weight_grads: bool = True,
                       weight_bytes: int | None = None) -> float:
    """Fewest HBM bytes the atomic-expert op must move (the floor of the cost model).

    Forward: each touched expert's u and v rows once (2*D*H*b), h read and out written
    once (2*T*H*b), indices (4 B) and routing weights (b) once.
    ``backward=True`` returns forward + backward: u and v rows again (2*D*H*b), h and
    do read, dh written (3*T*H*b), dw written (T*k*b), and the weight gradients:
    2*E*H*b for the dense (E, H) tensors autograd needs (``dense_weight_grads``), or
    2*D*H*b if only touched rows had to be written.
    ``distinct`` (D) defaults to the expectation under uniform routing; ``weight_bytes``
    (default ``dtype_bytes``) is the routing weights' element size (4 in the layer, whose
    scores are float32).
    """
    b = dtype_bytes
    bw = b if weight_bytes is None else weight_bytes
    D = expected_distinct_experts(T, k, E) if distinct is None else distinct
    fwd = 2 * D * H * b + 2 * T * H * b + T * k * (4 + bw)
    if not backward:
        return fwd
    grads = 2 * (E if dense_weight_grads else D) * H * b
    return fwd + 2 * D * H * b + 3 * T * H * b + T * k * (4 + 2 * bw) + grads
