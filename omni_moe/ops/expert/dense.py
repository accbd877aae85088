"""The "dense" schedule of the expert op: its per-token products as dense GEMMs.

When a token routes to a sizeable share of the experts (the paper's K = 4096 of 102,400
is 4 %), gathering two H-element rows per pair costs more than multiplying every token
by every expert on tensor cores.  Per chunk of n experts [e0, e0 + n):

    S      = h U_chunk^T            (T, n) float32: cuBLAS, bfloat16 products exact,
                                    float32 accumulation (``torch.mm(..., out_dtype=)``)
    a_p    = S[t, e - e0]           for the pairs whose expert is in the chunk
    c_p    = act(a_p) w_p
    C_i    = the i-th bfloat16 part of c scattered into a zeroed (T, n) matrix, where
             c = C_0 + C_1 + C_2 exactly (8 + 8 + 8 bits of float32's 24)
    out   += C_0 V_chunk + C_1 V_chunk + C_2 V_chunk      (float32 accumulation)

Every product c_i v is exact in float32, so the result keeps this op's contract (exact
products, float32 accumulation, one rounding at the end) with the tensor cores' summation
order.  The work is T * E * H * 2 * 4 flops whatever K is (each direction); the launch
rule takes this schedule from K >= E / 32, the measured crossover with the per-pair ones
(``kernels.choose_mode``; docs/expert.md, "Large K").

A dense product multiplies every token by every expert, so zeros meet every value of the
tables: a non-finite value in v (anywhere, routed or not) would poison every token's
output through 0 * inf.  Tokens whose result the dense form cannot reproduce are
"flagged" and their rows recomputed pair by pair (``_gather_combine_kernel``, the
"expert" schedule's sum): a token is flagged when one of its c_p is not finite or too
large for bfloat16, when two of its slots name the same expert (the scatter would keep
one), or -- all tokens -- when v holds a non-finite value.  So non-finite inputs give the
per-pair semantics exactly (only slower).

The backward runs the same way with the tables swapped: G = do V^T gives g_p, the pairs
kernel writes dw_p and da_p = act'(a_p) w_p g_p, and dh += DA_i U (flagged rows: the
gather-combine of u, every row when u holds a non-finite value).  The weight gradients
are the sorted pairs' ``_expert_grad_kernel`` or, with ``ExpertConfig.dense_weight_grads``
(``dense_weight_grads``), GEMMs of the same kind: per chunk du = DA_i^T h and
dv = C_i^T do into float32 accumulators; the pairs the parts cannot hold (a token that
repeats an expert or whose h or do row is not finite, a da_p or c_p not finite or beyond
bfloat16) are left out of the parts and added pair by pair, grouped by expert with one
sort, by ``_expert_grad_kernel`` starting from the accumulators, which then rounds once.

Only bfloat16 h, U and V (and do) take this path (the parts must share the table's
dtype, and float16's exponent range cannot hold a float32 coefficient); other dtypes run
the "expert" schedule.

``precision="bfloat16"`` (opt-in, ``PRECISIONS``) keeps one part: each coefficient c_p
(and da_p) rounded to bfloat16 (round to nearest even) before its product, one GEMM
instead of three per sum and a third of the parts' scratch.  A term of out, dh, du or
dv then carries a relative error of at most 2^-8 (bfloat16's unit roundoff, that of the
output's own rounding); the flagged rows and pairs stay exact, and so do a, g and dw.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._activations import act_fwd, act_fwd_bwd
from .._dispatch import autocast_off
from .._triton import loop_bound, to_dtype, to_f32

# Scratch per chunk: S (float32) and the bfloat16 parts, 10 bytes a (token, expert) with
# three parts.
_CHUNK_BYTES = 512 * 2**20
# Parts of each coefficient per precision: three hold a float32 significand exactly.
PRECISIONS = {"exact": 3, "bfloat16": 1}
# Largest |c| whose bfloat16 rounding is finite (bfloat16's max is 3.3895e38).
_C_MAX: tl.constexpr = tl.constexpr(3.38e38)


@triton.jit
def _chunk_slots(IDX, t, k0, K, e0, n, stride_it, stride_ik, BLOCK_K: tl.constexpr):
    """Slots r = k0.. of token t: (r, r < K, expert e (-1 past K), e in [e0, e0 + n))."""
    r = k0 + tl.arange(0, BLOCK_K)
    rm = r < K
    e = tl.load(IDX + t * stride_it + r.to(tl.int64) * stride_ik, mask=rm, other=-1).to(tl.int64)
    return r, rm, e, rm & (e >= e0) & (e < e0 + n)


@triton.jit
def _store_parts(dst, stride_pi, c, mask, NPARTS: tl.constexpr):
    """dst[i * stride_pi] = the i-th bfloat16 part of c, i < NPARTS: three add up to c
    exactly; one is c rounded to nearest even."""
    p0 = to_dtype(c, tl.bfloat16)
    tl.store(dst, p0, mask=mask)
    if NPARTS == 3:
        r1 = c - to_f32(p0)
        p1 = to_dtype(r1, tl.bfloat16)
        tl.store(dst + stride_pi, p1, mask=mask)
        tl.store(dst + 2 * stride_pi, to_dtype(r1 - to_f32(p1), tl.bfloat16), mask=mask)


@triton.jit
def _dense_pairs_kernel(
    S, S_BITS, IDX, R, A, COEF, PARTS, FLAG, DUP, VMIN, VMAX, DW,
    e0, n, K, E,
    stride_st, stride_it, stride_ik, stride_rt, stride_rk, stride_pi, stride_pt,
    stride_dwt, stride_dwk,
    ACT: tl.constexpr, LOG_W: tl.constexpr, BACKWARD: tl.constexpr, FIRST: tl.constexpr,
    WRITE_PARTS: tl.constexpr, NPARTS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One token t per program, its K slots BLOCK_K at a time, for the chunk [e0, e0 + n).

    Pass 1, for the slots whose expert e is in the chunk (with ``FIRST``, the slots
    outside [0, E) get zeros): forward (S = h U^T), a = S[t, e - e0], A[t, r] = a and
    COEF[t, r] = c = act(a) w; backward (S = do V^T), g = S[t, e - e0] and, from
    a = A[t, r], DW[t, r] = act(a) g (times w with LOG_W) and COEF[t, r] = da =
    act'(a) w g.  Pass 2: each such slot writes its slot number over its S entry.
    Pass 3: a slot that does not read its own number back shares its expert with another
    slot; it, a coefficient not finite or too large for bfloat16, or (``FIRST``) a
    non-finite VMIN/VMAX (of the table the parts multiply) flags the token (FLAG[t] = 1),
    the first also in DUP[t] = 1;
    every in-chunk slot stores the NPARTS bfloat16 parts of its coefficient at
    PARTS[i, t, e - e0] (three: exact; one: the coefficient rounded).  Passes 2 and 3 only with ``WRITE_PARTS`` (the backward without
    dh needs pass 1 alone).
    Grid: (T,).  Bytes: 3 reads of the token's K indices (the second and third from
    L2), per in-chunk slot one S read and write, the weight, 8 bytes of A and COEF (and
    DW) and 2 * NPARTS of parts; S's row is the token's own, so programs never share an address.
    """
    t = tl.program_id(0).to(tl.int64)
    anybad = tl.zeros((BLOCK_K,), dtype=tl.int32)
    repeats = tl.zeros((BLOCK_K,), dtype=tl.int32)
    if FIRST and WRITE_PARTS:
        vmin = to_f32(tl.load(VMIN))
        vmax = to_f32(tl.load(VMAX))
        # NaN compares false: a NaN or an infinity anywhere in the table flags every token.
        vok = (vmin > -float("inf")) & (vmax < float("inf"))
        anybad += tl.where(vok, 0, 1)
    for k0 in range(0, loop_bound(K), BLOCK_K):
        r, rm, e, inc = _chunk_slots(IDX, t, k0, K, e0, n, stride_it, stride_ik, BLOCK_K)
        keep = inc
        if FIRST:
            keep = rm & ((e < 0) | (e >= E) | inc)
        d = tl.load(S + t * stride_st + tl.where(inc, e - e0, 0), mask=inc, other=0.0)
        w = to_f32(tl.load(R + t * stride_rt + r.to(tl.int64) * stride_rk, mask=inc, other=0.0))
        if LOG_W:
            w = tl.where(inc, tl.exp(w), 0.0)
        if BACKWARD:
            a = tl.load(A + t * K + r, mask=inc, other=0.0)
            z, dz = act_fwd_bwd(a, ACT)
            dw = tl.where(inc, z * d, 0.0)
            if LOG_W:
                dw = dw * w
            tl.store(DW + t * stride_dwt + r.to(tl.int64) * stride_dwk,
                     to_dtype(dw, DW.dtype.element_ty), mask=keep)
            coef = tl.where(inc, dz * w * d, 0.0)
        else:
            tl.store(A + t * K + r, d, mask=keep)
            coef = tl.where(inc, act_fwd(d, ACT) * w, 0.0)
        tl.store(COEF + t * K + r, coef, mask=keep)
    if WRITE_PARTS:
        tl.debug_barrier()
        for k0 in range(0, loop_bound(K), BLOCK_K):
            r, rm, e, inc = _chunk_slots(IDX, t, k0, K, e0, n, stride_it, stride_ik, BLOCK_K)
            tl.store(S_BITS + t * stride_st + tl.where(inc, e - e0, 0), r, mask=inc)
        tl.debug_barrier()
        for k0 in range(0, loop_bound(K), BLOCK_K):
            r, rm, e, inc = _chunk_slots(IDX, t, k0, K, e0, n, stride_it, stride_ik, BLOCK_K)
            col = tl.where(inc, e - e0, 0)
            owner = tl.load(S_BITS + t * stride_st + col, mask=inc, other=0, cache_modifier=".cg")
            c = tl.load(COEF + t * K + r, mask=inc, other=0.0)
            big = tl.abs(c) <= _C_MAX            # false for NaN too
            repeats += tl.where(inc & (owner != r), 1, 0)
            anybad += tl.where(inc & (big == 0), 1, 0)
            _store_parts(PARTS + t * stride_pt + col, stride_pi, tl.where(big, c, 0.0), inc, NPARTS)
        tl.store(FLAG + t, 1, mask=tl.max(anybad + repeats, axis=0) > 0)
        tl.store(DUP + t, 1, mask=tl.max(repeats, axis=0) > 0)


def _mm_f32(x, y, acc=None):
    """x @ y (+ acc) with float32 output and accumulation; x, y bfloat16.  On CUDA
    cuBLAS (``out_dtype``); elsewhere (the interpreter's CPU runs) in float32, which holds
    every product of two bfloat16 values exactly."""
    if x.is_cuda:
        if acc is None:
            return torch.mm(x, y, out_dtype=torch.float32)
        return torch.addmm(acc, x, y, out_dtype=torch.float32)
    if acc is None:
        return torch.mm(x.float(), y.float())
    return torch.addmm(acc, x.float(), y.float())


def dense_chunk(T: int, E: int, chunk: int = 0, parts: int = 3) -> int:
    """Experts per chunk: ``chunk`` if > 0, else as many as keep the chunk's scratch
    (4 + 2 * ``parts`` bytes a token and expert) within 512 MiB, a multiple of 64."""
    if chunk > 0:
        return min(chunk, max(E, 1))
    n = _CHUNK_BYTES // ((4 + 2 * parts) * max(T, 1))
    return max(1, min(E, max(64, n // 64 * 64)))


def _dense_sum(x, rows, sums, w, idx, a, coef, dw, act_id: int, log_weights: bool, chunk: int,
               fixup, backward: bool, write_parts: bool, nparts: int, mark_repeats: bool = False):
    """The chunk loop of both directions: per chunk S = x rows_chunk^T, the pairs kernel,
    and (``write_parts``) acc += the ``nparts`` parts times sums_chunk; then ``fixup`` of
    the flagged rows.  Returns the float32 (T, H) accumulator (None without parts) and,
    with ``mark_repeats`` and parts, the (T,) int32 marks of the tokens that name an
    expert twice (else None)."""
    T = x.shape[0]
    K = idx.shape[1]
    E, H = rows.shape
    dev = x.device
    n_max = dense_chunk(T, E, chunk, nparts)
    flag = torch.zeros((T,), dtype=torch.int32, device=dev)
    # Without marks of their own the kernel writes them into flag, which holds them anyway.
    dup = torch.zeros((T,), dtype=torch.int32, device=dev) if write_parts and mark_repeats else None
    vmin, vmax = torch.aminmax(sums) if write_parts else (flag, flag)
    acc = torch.zeros((T, H), dtype=torch.float32, device=dev) if write_parts else None
    parts_buf = torch.empty((nparts, T, n_max if write_parts else 1), dtype=torch.bfloat16,
                            device=dev)
    block_k = max(16, min(256, triton.next_power_of_2(K)))
    dw_arg = dw if backward else coef
    # Under torch.autocast (bfloat16 tables with float32 other parameters reach this
    # schedule) autocast would recast the GEMMs' float32 operands and results to its dtype.
    with autocast_off(x):
        for e0 in range(0, E, n_max):
            n = min(n_max, E - e0)
            s = _mm_f32(x, rows[e0:e0 + n].t())
            parts = parts_buf[:, :, :n] if write_parts else parts_buf
            if write_parts:
                parts.zero_()
            _dense_pairs_kernel[(T,)](
                s, s.view(torch.int32), idx, w, a, coef, parts, flag,
                flag if dup is None else dup, vmin, vmax, dw_arg,
                e0, n, K, E,
                s.stride(0), idx.stride(0), idx.stride(1), w.stride(0), w.stride(1),
                parts.stride(0), parts.stride(1), dw_arg.stride(0), dw_arg.stride(1),
                ACT=act_id, LOG_W=log_weights, BACKWARD=backward, FIRST=e0 == 0,
                WRITE_PARTS=write_parts, NPARTS=nparts, BLOCK_K=block_k, num_warps=4,
            )
            del s
            if write_parts:
                v = sums[e0:e0 + n]
                for i in range(nparts):
                    acc = _mm_f32(parts[i], v, acc)
    if write_parts:
        fixup(coef, flag, acc)
    return acc, dup


def dense_forward(h, up, down, w, idx, a, out, act_id: int, log_weights: bool, chunk: int,
                  fixup, precision: str = "exact"):
    """out (T, H) and a (T, K) of the op in the dense schedule (h, up, down bfloat16),
    the coefficients in ``PRECISIONS[precision]`` parts.

    ``fixup(coef, flag, acc)``: recompute the flagged rows of the float32 accumulator
    ``acc`` pair by pair from the (T, K) float32 coefficients with the sum's table (the
    caller's gather-combine launch of v).  No host sync; scratch of about
    ``dense_chunk`` experts x (4 + 2 x parts) bytes a token.
    """
    T, H = h.shape
    K = idx.shape[1]
    E = up.shape[0]
    if T == 0:
        return out, a
    if E == 0 or K == 0 or H == 0:
        out.zero_()
        a.zero_()
        return out, a
    coef = torch.empty((T, K), dtype=torch.float32, device=h.device)
    acc, _ = _dense_sum(h, up, down, w, idx, a, coef, None, act_id, log_weights, chunk, fixup,
                        False, True, PRECISIONS[precision])
    out.copy_(acc)
    return out, a


def dense_backward(grad_out, h, up, down, w, idx, a, dw, da, dh, act_id: int, log_weights: bool,
                   chunk: int, fixup, precision: str = "exact", mark_repeats: bool = False):
    """dw (T, K), da (T, K) float32 (for the weight gradients) and, if ``dh`` is given,
    dh (T, H), written in the dense schedule (grad_out, h, up, down bfloat16).

    Per chunk G = do V^T (float32 output of exact products) gives g_p; the pairs kernel
    writes dw and da and, for dh, the parts of da (``PRECISIONS[precision]``), summed
    against U as the forward sums c against V; ``fixup`` (a gather-combine launch of u)
    recomputes the flagged rows.  Returns, with ``mark_repeats`` and ``dh`` given, the
    (T,) int32 marks of the tokens that name an expert twice (for ``dense_weight_grads``),
    else None.
    """
    T, H = h.shape
    K = idx.shape[1]
    E = up.shape[0]
    if T == 0:
        return
    if E == 0 or K == 0 or H == 0:
        da.zero_()
        dw.zero_()
        if dh is not None:
            dh.zero_()
        return
    acc, repeats = _dense_sum(grad_out, down, up, w, idx, a, da, dw, act_id, log_weights, chunk,
                              fixup, True, dh is not None, PRECISIONS[precision], mark_repeats)
    if dh is not None:
        dh.copy_(acc)
    return repeats


# --------------------------------------------------------------------------- weight gradients
# du = DA^T h and dv = C^T do, DA and C the (T, E) matrices of the pairs' da_p and c_p, as
# chunked GEMMs of their parts; the pairs the dense form cannot hold are summed pair by
# pair into the same float32 accumulators before the one rounding.

@triton.jit
def _fix_keys_kernel(IDX, A, DA, R, REPEATS, ROWBAD, KEY, K, E,
                     stride_it, stride_ik, stride_rt, stride_rk,
                     ACT: tl.constexpr, LOG_W: tl.constexpr, BLOCK_K: tl.constexpr):
    """KEY[t, r] = e for the pairs the weight gradients must sum pair by pair, else E:
    those of tokens that name an expert twice (REPEATS[t]) or whose h or do row is not
    finite (ROWBAD[t]; 0 * inf in a dense product would reach every expert), and those
    whose da or c = act(a) w is not finite or too large for bfloat16.  e outside [0, E):
    E.  Grid: (T, cdiv(K, BLOCK_K)).  Bytes: 16 a pair read, the key written."""
    t = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = r < K
    e = tl.load(IDX + t * stride_it + r.to(tl.int64) * stride_ik, mask=rm, other=-1).to(tl.int64)
    ok = rm & (e >= 0) & (e < E)
    a = tl.load(A + t * K + r, mask=ok, other=0.0)
    da = tl.load(DA + t * K + r, mask=ok, other=0.0)
    w = to_f32(tl.load(R + t * stride_rt + r.to(tl.int64) * stride_rk, mask=ok, other=0.0))
    if LOG_W:
        w = tl.exp(w)
    c = act_fwd(a, ACT) * w
    good = (tl.abs(c) <= _C_MAX) & (tl.abs(da) <= _C_MAX)
    token_bad = (tl.load(REPEATS + t) + tl.load(ROWBAD + t)) != 0
    fix = ok & ((good == 0) | token_bad)
    tl.store(KEY + t * K + r, tl.where(fix, e, E).to(KEY.dtype.element_ty), mask=rm)


@triton.jit
def _weight_parts_kernel(IDX, KEY, A, DA, R, PU, PV, e0, n, K, E,
                         stride_it, stride_ik, stride_rt, stride_rk, stride_pi, stride_pt,
                         ACT: tl.constexpr, LOG_W: tl.constexpr, NPARTS: tl.constexpr,
                         DO_U: tl.constexpr, DO_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Token t's slots whose expert e is in [e0, e0 + n) and not summed pair by pair
    (KEY[t, r] == E): the parts of da into PU[i, t, e - e0] (``DO_U``) and of
    c = act(a) w into PV[i, t, e - e0] (``DO_V``).  A token that names an expert twice
    has every pair keyed, so no two slots write one entry.  Grid: (T,).  Bytes: the
    token's K indices and keys, per in-chunk slot 12 bytes read, 2 * NPARTS written per
    table."""
    t = tl.program_id(0).to(tl.int64)
    for k0 in range(0, loop_bound(K), BLOCK_K):
        r, rm, e, inc = _chunk_slots(IDX, t, k0, K, e0, n, stride_it, stride_ik, BLOCK_K)
        key = tl.load(KEY + t * K + r, mask=inc, other=0).to(tl.int64)
        inc = inc & (key == E)
        col = t * stride_pt + tl.where(inc, e - e0, 0)
        if DO_U:
            da = tl.load(DA + t * K + r, mask=inc, other=0.0)
            _store_parts(PU + col, stride_pi, da, inc, NPARTS)
        if DO_V:
            a = tl.load(A + t * K + r, mask=inc, other=0.0)
            w = to_f32(tl.load(R + t * stride_rt + r.to(tl.int64) * stride_rk, mask=inc, other=0.0))
            if LOG_W:
                w = tl.exp(w)
            _store_parts(PV + col, stride_pi, act_fwd(a, ACT) * w, inc, NPARTS)


def dense_grad_chunk(T: int, E: int, H: int, chunk: int = 0, parts: int = 3) -> int:
    """Experts per chunk of the weight gradients: ``chunk`` if > 0, else as many as keep
    the two tables' parts (4 * ``parts`` bytes a token and expert) and float32
    accumulators (8 * H bytes an expert) within 512 MiB, a multiple of 64."""
    if chunk > 0:
        return min(chunk, max(E, 1))
    n = _CHUNK_BYTES // (4 * parts * max(T, 1) + 8 * max(H, 1))
    return max(1, min(E, max(64, n // 64 * 64)))


def dense_weight_grads(grad_out, h, w, idx, a, da, repeats, dup, ddown, act_id: int,
                       log_weights: bool, chunk: int, key_dtype, group, fixup,
                       precision: str = "exact"):
    """du (``dup``, (E, H)) and dv (``ddown``) of the dense schedule, either None: not
    wanted; every row written.  ``a``, ``da``: the (T, K) float32 pre-activations and
    their gradients (``dense_backward``'s); ``repeats``: its marks of tokens naming an
    expert twice.

    Keys (``_fix_keys_kernel``, ``key_dtype`` wide enough for E) pick the pairs summed pair
    by pair -- usually none --, ``group(key)`` (a stable sort) gives their permutation and
    per-expert offsets; then per chunk of
    experts: zero the parts, ``_weight_parts_kernel``, acc_u = sum_i DA_i^T h and acc_v =
    sum_i C_i^T do (float32 GEMMs of exact products; h and do with their non-finite rows
    zeroed), and ``fixup(offsets, perm, acc_u, acc_v, du_chunk, dv_chunk)`` adds the keyed
    pairs in token order and rounds once.  No host sync.
    """
    T, H = h.shape
    K = idx.shape[1]
    E = (dup if dup is not None else ddown).shape[0]
    dev = h.device
    nparts = PRECISIONS[precision]
    rowbad = (~(torch.isfinite(h).all(1) & torch.isfinite(grad_out).all(1))).to(torch.int32)
    key = torch.empty((T, K), dtype=key_dtype, device=dev)
    block_k = max(16, min(1024, triton.next_power_of_2(K)))
    _fix_keys_kernel[(T, triton.cdiv(K, block_k))](
        idx, a, da, w, repeats, rowbad, key, K, E,
        idx.stride(0), idx.stride(1), w.stride(0), w.stride(1),
        ACT=act_id, LOG_W=log_weights, BLOCK_K=block_k, num_warps=4)
    perm, offsets = group(key)
    keep = rowbad[:, None] == 0
    hm = torch.where(keep, h, 0) if dup is not None else None
    gm = torch.where(keep, grad_out, 0) if ddown is not None else None
    n_max = dense_grad_chunk(T, E, H, chunk, nparts)
    pu = torch.empty((nparts, T, n_max), dtype=torch.bfloat16, device=dev) if dup is not None else None
    pv = torch.empty((nparts, T, n_max), dtype=torch.bfloat16, device=dev) if ddown is not None else None
    block_k = max(16, min(256, triton.next_power_of_2(K)))
    with autocast_off(h):
        for e0 in range(0, E, n_max):
            n = min(n_max, E - e0)
            pu_c = pu[:, :, :n] if pu is not None else None
            pv_c = pv[:, :, :n] if pv is not None else None
            for p in (pu_c, pv_c):
                if p is not None:
                    p.zero_()
            ref = pu_c if pu_c is not None else pv_c
            _weight_parts_kernel[(T,)](
                idx, key, a, da, w, pu_c if pu_c is not None else ref,
                pv_c if pv_c is not None else ref, e0, n, K, E,
                idx.stride(0), idx.stride(1), w.stride(0), w.stride(1),
                ref.stride(0), ref.stride(1),
                ACT=act_id, LOG_W=log_weights, NPARTS=nparts, DO_U=pu_c is not None,
                DO_V=pv_c is not None, BLOCK_K=block_k, num_warps=4)
            acc_u = acc_v = None
            for i in range(nparts):
                if pu_c is not None:
                    acc_u = _mm_f32(pu_c[i].t(), hm, acc_u)
                if pv_c is not None:
                    acc_v = _mm_f32(pv_c[i].t(), gm, acc_v)
            fixup(offsets[e0:e0 + n + 1], perm, acc_u, acc_v,
                  dup[e0:e0 + n] if dup is not None else None,
                  ddown[e0:e0 + n] if ddown is not None else None)
