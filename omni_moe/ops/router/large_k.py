"""The large-k omni router: exact top-k for every k up to N^2 in O(T * k) memory.

Per token (x, y: rows of N logits; s[i, j] = float32(x[i]) + float32(y[j]), keys in
the router's total order, NaN below -inf):

1. sort each axis descending by key (equal keys by column), so row i of the grid, read
   along the sorted y, is a sequence of sums whose keys never increase -- for every x[i]
   but -inf when y holds +inf (-inf + +inf is NaN, above nothing); such a row starts
   after y's +inf entries and wraps around to them last, which restores the order;
2. find tau, the k-th largest pair key, by a search over the int32 key space: the
   number of pairs with key >= t is the sum over rows of a prefix length, each found by
   a binary search inside the bracket that earlier probes left for that row; after each
   probe the bracket's ends snap to existing pair keys (so rows with few distinct sums,
   ties, finish in a few probes); the first probe is the best rectangle bound
   max_a key(x[a] + y[ceil(k / (a + 1)) - 1]), later ones interpolate the counts
   linearly (bisecting when that did not halve the range), and the search stops early
   when exactly k pairs reach the lower end;
3. take from every row its pairs above tau, then pairs equal to tau in row order until k
   (ties: deterministic, any pair of the equal value is allowed), row i's pairs being a
   prefix of its sequence, placed at the exclusive prefix sum of the row counts;
4. write them in that order (``sorted=False``: grouped by x rank, each group descending),
   or sort them descending by 64-bit key (value, then flat index ascending): in
   registers in the same kernel ("fused"), or write the keys and sort each row in
   registers in a second kernel ("split": the first kernel then needs far fewer
   registers, so more programs hide its latency), or, past ``sort_block``, with
   ``torch.sort`` ("torch").

Nothing of size N^2 or k'^2 exists: the extra memory is the outputs, O(programs * (N +
emit width)) int32 of scratch (L2-resident) and, for the split and torch sorts, T * k
int64 keys (plus, for torch.sort, its own two (T, k) int64 outputs).  Work per token:
two sorts of next_pow2(N) keys; 9-12 probes on average on log-softmax rows at N = 320
(counted with the PyTorch twin; 1-3 on integer-valued rows; at most 64), each a few
gathers per row (the brackets shrink as the search narrows); k slots of six gathers;
the output sort (k log^2 k / 4 compare-exchanges in registers).  ``cpu.router_large_k``
is the same algorithm in PyTorch; both give bitwise the same outputs in both orders.
docs/router.md ("Large k") has the exactness argument.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._checks import check_choice, check_int, check_pow2, with_fields
from .._dispatch import device_info
from .._triton import (
    KEY_NONE,
    bitonic_topk,
    f32_from_key,
    f32_key,
    half_from_key,
    half_key,
    loop_bound,
    to_dtype,
)

# The widest axis the kernel sorts in registers (next_pow2(N)); wider rows run the
# PyTorch large-k algorithm on the same device.
MAX_AXIS = 4096
# float32 bit patterns of +inf and -inf (as int32).
_POS_INF_BITS: tl.constexpr = tl.constexpr(0x7F800000)
_NEG_INF_BITS: tl.constexpr = tl.constexpr(-0x800000)


@dataclass(frozen=True)
class LargeKConfig:
    """Launch configuration of the large-k kernel.

    tile_t: tokens per program tile (power of two).
    emit_block: output slots per emission step (power of two).
    sort: how sorted outputs are sorted while next_pow2(k) <= sort_block: "fused" (in
        the router kernel, one emission step of next_pow2(k) slots), "split" (keys
        written, then ``_sort_rows_kernel``) or "torch" (keys written, ``torch.sort``).
    sort_block: the widest sort done in registers (power of two); wider sorted outputs
        use "torch".
    warps: warps per program of the router kernel (the split sort kernel: 4, 8 from
        2048 slots).
    progs_per_sm: persistent programs per multiprocessor (each owns tile_t scratch rows).
    first_probe: start the search at the rectangle bound (else in the middle of the key
        range).
    """

    tile_t: int = 1
    emit_block: int = 1024
    sort: str = "fused"
    sort_block: int = 4096
    warps: int = 4
    progs_per_sm: int = 16
    first_probe: bool = True


# ---------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------


@triton.jit
def _sorted_axis(P, rows64, row_ok, stride_t, stride_n, N, NP: tl.constexpr, LNP: tl.constexpr,
                 PACKED: tl.constexpr):
    # Each token's N logits sorted descending by key, equal keys by column ascending:
    # (float32 values, int32 columns), [TILE_T, NP]; positions >= N hold padding.
    cols = tl.arange(0, NP)[None, :]
    colok = cols < N
    v = tl.load(P + rows64[:, None] * stride_t + cols.to(tl.int64) * stride_n,
                mask=row_ok[:, None] & colok, other=0.0)
    if PACKED:
        # One distinct int32 per element: value's ordered 16 bits, then 0xFFFF - column.
        key = tl.where(colok, half_key(v, cols), KEY_NONE)
        srt, _ = bitonic_topk(key, key, LNP, LNP, False, True)
        val, col = half_from_key(srt, P.dtype.element_ty)
    else:
        # Distinct 64-bit keys: the value's ordered 32 bits, then 2^31 - 1 - column.
        key = tl.where(colok, f32_key(v.to(tl.float32)), KEY_NONE).to(tl.int64)
        ck = (key << 32) | (0x7FFFFFFF - cols).to(tl.int64)
        srt, _ = bitonic_topk(ck, ck, LNP, LNP, False, True)
        val = f32_from_key((srt >> 32).to(tl.int32))
        col = 0x7FFFFFFF - (srt & 0x7FFFFFFF).to(tl.int32)
    return val, col


@triton.jit
def _large_k_router_kernel(
    X, Y, S, I, KEYS, SCR,
    T, N, K, num_tiles,
    stride_xt, stride_xn, stride_yt, stride_yn,
    stride_st, stride_sk, stride_it, stride_ik,
    TILE_T: tl.constexpr, NP: tl.constexpr, LNP: tl.constexpr, KC: tl.constexpr,
    LKC: tl.constexpr, MODE: tl.constexpr, PACKED: tl.constexpr, FIRST_PROBE: tl.constexpr,
):
    """Exact top-K of x[t, i] + y[t, j] over all N^2 pairs, any K <= N^2.

    Grid: (P,) persistent programs; program p handles tiles p, p + P, ... of TILE_T
    tokens and owns TILE_T scratch rows of 5 NP + KC int32 words, one per tile lane:
    sorted y values and columns (YS, CY), per nonempty grid row (by rank among them) its
    first output slot, x value and x column (RO, RX, RC), and KC slot markers (MK).
    NP = 2^LNP >= N; KC = 2^LKC slots per emission step.  MODE 0: write S[t, :K],
    I[t, :K] in emission order; 1: sort the K <= KC slots in registers, then write them;
    2: write 64-bit sort keys to KEYS[t, :K] (contiguous) for the host to sort.
    Bytes: reads 2*T*N*b logits, writes T*K*(b + 4) outputs (MODE 2: T*K*8 keys).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lane = tl.arange(0, TILE_T)
    base = SCR + ((pid * TILE_T + lane).to(tl.int64) * (5 * NP + KC))[:, None]
    YS = base
    CY = base + NP
    RO = base + 2 * NP
    RX = base + 3 * NP
    RC = base + 4 * NP
    MK = base + 5 * NP
    ar = tl.arange(0, NP)[None, :]
    valid = ar < N
    qa = tl.arange(0, KC)[None, :]
    # Markers carry a stamp unique to the (tile, step) of this program, so the marker
    # rows are cleared once, here, not before every step.
    tl.store(MK + qa, tl.zeros([TILE_T, KC], dtype=tl.int32))
    stamp = 0
    for tile in range(loop_bound(pid), loop_bound(num_tiles), loop_bound(nprog)):
        rows = tile * TILE_T + lane
        row_ok = rows < T
        rows64 = rows.to(tl.int64)
        xs, cx = _sorted_axis(X, rows64, row_ok, stride_xt, stride_xn, N, NP, LNP, PACKED)
        ys, cy = _sorted_axis(Y, rows64, row_ok, stride_yt, stride_yn, N, NP, LNP, PACKED)
        # The scratch rows are written and read by different threads of the program.
        tl.debug_barrier()
        tl.store(YS + ar, ys.to(tl.int32, bitcast=True))
        tl.store(CY + ar, cy)
        tl.debug_barrier()

        # Row i reads y from rank start[i] (cyclically): past y's +inf entries when
        # x[i] = -inf, so that its keys never increase (-inf + +inf is NaN).
        p_inf = tl.sum(((ys.to(tl.int32, bitcast=True) == _POS_INF_BITS) & valid).to(tl.int32), axis=1)
        p_inf = p_inf[:, None]
        start = tl.where((xs.to(tl.int32, bitcast=True) == _NEG_INF_BITS) & (p_inf < N), p_inf, 0)
        y0 = tl.load(YS + start).to(tl.float32, bitcast=True)
        k0 = tl.where(valid, f32_key(xs + y0), KEY_NONE)

        # Search on the key t, per token.  C(t) = number of pairs with key >= t;
        # invariant C(lo) = c_lo >= K > C(hi) = c_hi; per row, ch = its count at lo, cl
        # at hi.
        hi = tl.max(k0, axis=1).to(tl.int64) + 1
        lo = hi * 0 + KEY_NONE
        c_lo = (hi * 0).to(tl.int32) + N * N
        c_hi = (hi * 0).to(tl.int32)
        cl = tl.zeros([TILE_T, NP], dtype=tl.int32)
        ch = cl + tl.where(valid, N, 0)
        if FIRST_PROBE:
            # The best rectangle bound: (a + 1) * (b + 1) >= K pairs dominate (a, b)
            # when rows are monotone; any probe strictly inside (lo, hi) is valid.
            b = (K + ar) // (ar + 1) - 1
            okb = valid & (b < N)
            yb = tl.load(YS + b, mask=okb, other=0).to(tl.float32, bitcast=True)
            probe = tl.max(tl.where(okb, f32_key(xs + yb), KEY_NONE), axis=1).to(tl.int64)
            probe = tl.where(probe > lo, probe, lo + ((hi - lo) >> 1))
        else:
            probe = lo + ((hi - lo) >> 1)
        interp = row_ok
        live = row_ok & (hi - lo > 1) & (c_lo != K)
        while tl.max(live.to(tl.int32), axis=0) > 0:
            t32 = probe.to(tl.int32)[:, None]
            a = cl
            bb = tl.where(live[:, None], ch, cl)
            # Per row, the count lies in [a, bb]; binary search on the open brackets.
            while tl.max(tl.max(bb - a, axis=1), axis=0) > 0:
                act = a < bb
                m = (a + bb + 1) >> 1
                j = start + m - 1
                j = tl.where(j >= N, j - N, j)
                yv = tl.load(YS + j, mask=act, other=0).to(tl.float32, bitcast=True)
                kk = f32_key(xs + yv)
                a = tl.where(act & (kk >= t32), m, a)
                bb = tl.where(act & (kk < t32), m - 1, bb)
            c = tl.sum(a, axis=1)
            up = live & (c >= K)
            down = live & (c < K)
            # Snap to the data (same counts): lo to the smallest pair key >= t, hi to
            # the largest key < t plus one -- rows' entries at a - 1 and at a.
            has = valid & (a > 0)
            j = start + a - 1
            j = tl.where(j >= N, j - N, j)
            yv = tl.load(YS + j, mask=has, other=0).to(tl.float32, bitcast=True)
            above = tl.min(tl.where(has, f32_key(xs + yv), 0x7FFFFFFF), axis=1).to(tl.int64)
            has = valid & (a < N)
            j = start + a
            j = tl.where(j >= N, j - N, j)
            yv = tl.load(YS + j, mask=has, other=0).to(tl.float32, bitcast=True)
            below = tl.max(tl.where(has, f32_key(xs + yv), KEY_NONE), axis=1).to(tl.int64) + 1
            span = hi - lo
            lo = tl.where(up, above, lo)
            c_lo = tl.where(up, c, c_lo)
            ch = tl.where(up[:, None], a, ch)
            hi = tl.where(down, below, hi)
            c_hi = tl.where(down, c, c_hi)
            cl = tl.where(down[:, None], a, cl)
            # Next probe: where the line through (lo, c_lo), (hi, c_hi) reaches K + 1/2,
            # after a bisection or after an interpolation that halved the range; else
            # the middle (at most two probes per halving).
            interp = tl.where(live, (interp == 0) | (2 * (hi - lo) <= span), interp)
            frac = ((c_lo - K).to(tl.float32) - 0.5) / tl.maximum(c_lo - c_hi, 1).to(tl.float32)
            ti = lo + ((hi - lo).to(tl.float32) * frac).to(tl.int64)
            ti = tl.minimum(tl.maximum(ti, lo + 1), hi - 1)
            probe = tl.where(interp, ti, lo + ((hi - lo) >> 1))
            live = row_ok & (hi - lo > 1) & (c_lo != K)

        # Exactly K pairs at or above lo: all of them.  Else tau = lo: every row's pairs
        # above tau (cl) plus its ties at tau, taken in row order until K.
        cl = tl.where((c_lo == K)[:, None], ch, cl)
        ties = ch - cl
        need = (K - tl.sum(cl, axis=1))[:, None]
        take = tl.minimum(tl.maximum(need - (tl.cumsum(ties, axis=1) - ties), 0), ties)
        n = cl + take
        o = tl.cumsum(n, axis=1) - n  # first slot of each row
        nz = (n > 0) & row_ok[:, None]
        rank = tl.cumsum(nz.to(tl.int32), axis=1) - 1
        tl.store(RO + rank, o, mask=nz)
        tl.store(RX + rank, xs.to(tl.int32, bitcast=True), mask=nz)
        tl.store(RC + rank, cx, mask=nz)

        for q0 in range(0, loop_bound(K), KC):
            # Slot -> row: a marker at each nonempty row's first slot, a prefix count.
            stamp += 1
            first = nz & (o >= q0) & (o < q0 + KC)
            tl.debug_barrier()
            tl.store(MK + (o - q0), tl.zeros([TILE_T, NP], dtype=tl.int32) + stamp, mask=first)
            tl.debug_barrier()
            marks = (tl.load(MK + qa) == stamp).to(tl.int32)
            before = tl.sum((nz & (o < q0)).to(tl.int32), axis=1)[:, None]
            q = q0 + qa
            qok = row_ok[:, None] & (q < K)
            rk = tl.where(qok, before + tl.cumsum(marks, axis=1) - 1, 0)
            o_r = tl.load(RO + rk, mask=qok, other=0)
            xb = tl.load(RX + rk, mask=qok, other=0)
            cx_r = tl.load(RC + rk, mask=qok, other=0)
            st = tl.where((xb == _NEG_INF_BITS) & (p_inf < N), p_inf, 0)
            j = st + q - o_r
            j = tl.where(j >= N, j - N, j)
            yv = tl.load(YS + j, mask=qok, other=0).to(tl.float32, bitcast=True)
            cy_j = tl.load(CY + j, mask=qok, other=0)
            s = xb.to(tl.float32, bitcast=True) + yv
            flat = cx_r * N + cy_j
            q64 = q.to(tl.int64)
            if MODE == 0:
                tl.store(S + rows64[:, None] * stride_st + q64 * stride_sk, to_dtype(s, S.dtype.element_ty),
                         mask=qok)
                tl.store(I + rows64[:, None] * stride_it + q64 * stride_ik, flat, mask=qok)
            else:
                # Distinct 64-bit keys: value, then 2^31 - 1 - flat index (padding: the
                # lowest value, then the slot).
                hi32 = tl.where(qok, f32_key(s), KEY_NONE).to(tl.int64)
                sk = (hi32 << 32) | tl.where(qok, 0x7FFFFFFF - flat, qa).to(tl.int64)
                if MODE == 1:
                    srt, _ = bitonic_topk(sk, sk, LKC, LKC, False, True)
                    s = f32_from_key((srt >> 32).to(tl.int32))
                    flat = 0x7FFFFFFF - (srt & 0x7FFFFFFF).to(tl.int32)
                    tl.store(S + rows64[:, None] * stride_st + q64 * stride_sk,
                             to_dtype(s, S.dtype.element_ty), mask=qok)
                    tl.store(I + rows64[:, None] * stride_it + q64 * stride_ik, flat, mask=qok)
                else:
                    tl.store(KEYS + rows64[:, None] * K + q64, sk, mask=qok)


@triton.jit
def _sort_rows_kernel(KEYS, S, I, K, stride_st, stride_sk, stride_it, stride_ik,
                      KC: tl.constexpr, LKC: tl.constexpr):
    """Row t of the router kernel's 64-bit keys (KEYS[t, :K], K <= KC = 2^LKC) sorted
    descending in registers, decoded into S[t, :K] and I[t, :K].  Grid: (T,).  Bytes:
    reads T*K*8, writes T*K*(b + 4)."""
    row64 = tl.program_id(0).to(tl.int64)
    q = tl.arange(0, KC)[None, :]
    ok = q < K
    q64 = q.to(tl.int64)
    sk = tl.load(KEYS + row64 * K + q64, mask=ok, other=0)
    # Padding below every real key (whose value part is >= KEY_NAN), distinct by slot.
    pad = (tl.zeros([1, KC], dtype=tl.int64) + KEY_NONE) << 32 | q64
    srt, _ = bitonic_topk(tl.where(ok, sk, pad), sk, LKC, LKC, False, True)
    s = f32_from_key((srt >> 32).to(tl.int32))
    tl.store(S + row64 * stride_st + q64 * stride_sk, to_dtype(s, S.dtype.element_ty), mask=ok)
    tl.store(I + row64 * stride_it + q64 * stride_ik, 0x7FFFFFFF - (srt & 0x7FFFFFFF).to(tl.int32),
             mask=ok)


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------


def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def kernel_ok(N: int) -> bool:
    """Whether the kernel serves rows of N logits (both axes sorted in registers)."""
    return _pow2(N) <= MAX_AXIS


def default_config(T: int, N: int, k: int, sm_major: int = 9, sorted: bool = True) -> LargeKConfig | None:
    """The launch configuration for a shape (None: N too wide for the kernel).

    ``benchmarks/router_large_k.py`` compares the variants (docs/router.md): one token
    per program, 4 warps, 16 persistent programs per SM (2-7 % faster than 4 at T = 4096,
    k = 512-4096, the same at decode sizes; H100); sorted outputs up to 512 slots
    sorted in the router kernel, wider ones by the split sort kernel (H100, T = 4096,
    N = 320, k = 1024: split 539 us, fused 997; compiled for sm90:
    a fused 4096-slot sort needs 8 warps and ~206 registers a thread, one program per
    SM, where the unsorted kernel needs ~90 at 4 warps).  ``sm_major`` 0 (no GPU:
    Triton's interpreter, whose cost is per operation, not per element): 16 tokens per
    tile."""
    if not kernel_ok(N):
        return None
    if sm_major == 0:
        return LargeKConfig(tile_t=16)
    # Rows of 2048+ logits: 8 warps (at 4096 and 4 warps ptxas spills).
    return LargeKConfig(sort="fused" if _pow2(k) <= 512 else "split", warps=8 if _pow2(N) >= 2048 else 4)


class _Launch(NamedTuple):
    programs: int
    num_tiles: int
    scratch_words: int
    mode: int              # the router kernel's MODE
    sort: str | None       # after MODE 2: "split" or "torch"
    constants: dict
    sort_constants: dict   # the split sort kernel's


def _check_config(config) -> LargeKConfig:
    if not isinstance(config, LargeKConfig):
        raise TypeError(f"config must be a LargeKConfig, got {type(config).__name__}")
    check_choice("config.sort", config.sort, ("fused", "split", "torch"))
    if not isinstance(config.first_probe, bool):
        raise TypeError(f"config.first_probe must be a bool, got {type(config.first_probe).__name__}")
    return with_fields(config, tile_t=check_pow2("config.tile_t", config.tile_t),
                       emit_block=check_pow2("config.emit_block", config.emit_block),
                       sort_block=check_pow2("config.sort_block", config.sort_block),
                       warps=check_pow2("config.warps", config.warps),
                       progs_per_sm=check_int("config.progs_per_sm", config.progs_per_sm, 1))


@functools.lru_cache(maxsize=4096)
def plan(T: int, N: int, k: int, sorted: bool, dtype: torch.dtype, device: torch.device,
         config: LargeKConfig | None = None) -> _Launch:
    """The launch ``large_k_router_forward`` makes (cached: host time matters)."""
    sms, major = device_info(device)
    if config is None:
        config = default_config(T, N, k, major, sorted)
    else:
        config = _check_config(config)
    if config is None or not kernel_ok(N):
        raise ValueError(f"the large-k kernel sorts axes of at most {MAX_AXIS} logits, got N={N}")
    NP = max(2, _pow2(N))
    kp = max(2, _pow2(k))
    sort = None
    if not sorted:
        mode, kc = 0, min(kp, max(2, config.emit_block))
    elif kp <= config.sort_block and config.sort == "fused":
        mode, kc = 1, kp
    else:
        mode, kc = 2, min(kp, max(2, config.emit_block))
        sort = config.sort if kp <= config.sort_block else "torch"
    tile_t = min(config.tile_t, _pow2(max(1, T)))
    num_tiles = -(-T // tile_t)
    programs = max(1, min(num_tiles, sms * config.progs_per_sm))
    consts = dict(TILE_T=tile_t, NP=NP, LNP=NP.bit_length() - 1, KC=kc, LKC=kc.bit_length() - 1,
                  MODE=mode, PACKED=dtype != torch.float32, FIRST_PROBE=config.first_probe,
                  num_warps=config.warps)
    sort_consts = dict(KC=kp, LKC=kp.bit_length() - 1, num_warps=8 if kp >= 2048 else 4)
    return _Launch(programs, num_tiles, programs * tile_t * (5 * NP + kc), mode, sort, consts, sort_consts)


def _decode_keys(keys: torch.Tensor, dtype: torch.dtype):
    """(scores, int32 indices) from the kernel's 64-bit keys (value << 32 | 2^31-1-flat)."""
    k32 = (keys >> 32).to(torch.int32)
    bits = torch.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF)
    scores = bits.view(torch.float32).to(dtype)
    return scores, (0x7FFFFFFF - (keys & 0x7FFFFFFF)).to(torch.int32)


def large_k_router_forward(x: torch.Tensor, y: torch.Tensor, k: int, scores=None, indices=None, *,
                           sorted: bool = True, config: LargeKConfig | None = None):
    """Exact top-k of x[t, i] + y[t, j] for any k <= N^2; (scores (T, k), int32 indices).

    x, y: (T, N) float32/float16/bfloat16, any strides, one device (CUDA, or CPU under
    TRITON_INTERPRET=1), next_pow2(N) <= MAX_AXIS.  ``scores``/``indices`` may be
    preallocated (any strides).  ``sorted``: descending (equal scores by flat index);
    else grouped by x rank, each group descending (``cpu.router_large_k``'s order).
    ``config``: a ``LargeKConfig`` instead of ``default_config``'s.
    """
    T, N = x.shape
    if scores is None:
        scores = torch.empty((T, k), dtype=x.dtype, device=x.device)
    if indices is None:
        indices = torch.empty((T, k), dtype=torch.int32, device=x.device)
    if config is not None:
        config = _check_config(config)
    if T == 0 or k == 0:
        return scores, indices
    launch = plan(T, N, k, bool(sorted), x.dtype, x.device, config)
    scratch = torch.empty(launch.scratch_words, dtype=torch.int32, device=x.device)
    keys = torch.empty((T, k), dtype=torch.int64, device=x.device) if launch.mode == 2 else indices
    _large_k_router_kernel[(launch.programs,)](
        x, y, scores, indices, keys, scratch, T, N, k, launch.num_tiles,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        scores.stride(0), scores.stride(1), indices.stride(0), indices.stride(1),
        **launch.constants,
    )
    if launch.sort == "split":
        _sort_rows_kernel[(T,)](keys, scores, indices, k, scores.stride(0), scores.stride(1),
                                indices.stride(0), indices.stride(1), **launch.sort_constants)
    elif launch.sort == "torch":
        s, i = _decode_keys(torch.sort(keys, dim=1, descending=True).values, x.dtype)
        scores.copy_(s)
        indices.copy_(i)
    return scores, indices
