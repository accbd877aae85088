"""The full-scan omni router: every one of the N*N expert pairs of each token is scored.

For each token t and every flat expert e = i*N + j the router forms

    s[t, e] = float32(x[t, i]) + float32(y[t, j])

and returns the k largest, sorted descending (scores rounded to the input dtype with
round-to-nearest-even, indices int32).  It costs O(T * N^2 * k) simple operations: the
slow, obviously-exact twin of the pruned router (``pruned.py``), which the tests and
benchmarks compare against, and the algorithm behind ``route(..., "fullscan")`` and
``omni_moe.triton.omni_router.triton_omni_router_func``.

Selection works on 64-bit keys

    key = ordered(s) << 32 | (2^31 - 1 - e)

where ``ordered`` maps float32 bits to int32 with the same order and sends every NaN to
INT32_MIN (below -inf).  One ``max`` therefore yields both the value and the position,
ties go to the lower flat index, and because every key holds its own position the k
keys picked are distinct even when all sums are NaN or -inf.  Positions outside the grid
(and picked positions) hold ``_NONE`` = INT64_MIN, below every real key: with
N^2 < 2^31 - 1 the low half of a real key is positive.  Scores are decoded from the key
(the float32 sum is recoverable from its ordered bits), so no second load is needed.

Kernels (all grids are 1-D, so neither T nor the chunk count meets the 65535 limit of
grid axes 1 and 2):

- ``_fullscan_small_kernel`` (N < 128): one program per tile of TILE_T tokens holds all
  N^2 keys of its tokens in registers and runs k rounds of max + knock-out.
- ``_fullscan_chunk_kernel`` + ``_fullscan_merge_kernel`` (N >= 128): the N^2 flat
  indices are cut into chunks of CHUNK; program (t, c) writes the top-min(k, CHUNK) keys
  of chunk c for token t into an int64 workspace of shape (T, chunks * min(k, CHUNK)),
  then the merge kernel takes the top-k of each workspace row.  By the usual argument
  the union of per-chunk top-k holds the global top-k.

Bytes moved (b = bytes per logit): every kernel reads 2*T*N*b logits from HBM once
(each logit is re-read N times per token, from L1/L2) and writes T*k*(b + 4) outputs;
the split path also writes and reads back T * chunks * min(k, CHUNK) * 8 workspace bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._checks import check_pow2, with_fields
from .._triton import loop_bound, to_dtype, to_f32

# Below every real key (see module docstring); used for padding and knocked-out picks.
_NONE: tl.constexpr = tl.constexpr(-(2**63))
# Ordered bits of every NaN: below -inf's (0xFF800000 -> -2139095041).
_NAN_ORDER: tl.constexpr = tl.constexpr(-(2**31))


@triton.jit
def _pair_keys(xv, yv, flat):
    """64-bit selection keys of the float32 sums ``xv + yv`` at flat indices ``flat``."""
    s = xv + yv
    bits = s.to(tl.int32, bitcast=True)
    # Negative floats order backwards in their bits: flip the magnitude bits.
    o = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    o = tl.where(s != s, _NAN_ORDER, o)
    return (o.to(tl.int64) << 32) + (2147483647 - flat).to(tl.int64)


@triton.jit
def _decode_key(key):
    """Inverse of ``_pair_keys``: (float32 sum, int32 flat index).  NaN keys give NaN."""
    o = (key >> 32).to(tl.int32)
    bits = tl.where(o >= 0, o, o ^ 0x7FFFFFFF)
    s = bits.to(tl.float32, bitcast=True)
    idx = 2147483647 - (key & 0x7FFFFFFF).to(tl.int32)
    return s, idx


@triton.jit
def _load_keys(X, Y, rows64, row_ok, e, N,
               stride_xt, stride_xn, stride_yt, stride_yn):
    """Keys of flat indices ``e`` (1-D) for the token rows ``rows64``; padding -> _NONE."""
    i = e // N
    j = e - i * N
    ok = row_ok[:, None] & (e < N * N)[None, :]
    # int64 offsets: a transposed view has stride_xn = T, and i * T can pass 2^31.
    xv = to_f32(tl.load(X + rows64[:, None] * stride_xt + i.to(tl.int64)[None, :] * stride_xn,
                        mask=ok, other=0.0))
    yv = to_f32(tl.load(Y + rows64[:, None] * stride_yt + j.to(tl.int64)[None, :] * stride_yn,
                        mask=ok, other=0.0))
    keys = _pair_keys(xv, yv, e[None, :])
    return tl.where(ok, keys, _NONE)


@triton.jit
def _emit_topk(keys, K, S, s_ptr, i_ptr, stride_sk, stride_ik, row_ok):
    # Write the K largest keys of each row of `keys` ([TILE_T, B], in registers) in
    # descending order: round r takes the row max, stores its decoded score and index at
    # column r and knocks it out (keys are unique per row: they hold their position).
    for r in range(loop_bound(K)):
        m = tl.max(keys, axis=1)
        keys = tl.where(keys == m[:, None], _NONE, keys)
        s, idx = _decode_key(m)
        r64 = tl.cast(r, tl.int64)  # r * stride can pass 2^31
        tl.store(s_ptr + r64 * stride_sk, to_dtype(s, S.dtype.element_ty), mask=row_ok)
        tl.store(i_ptr + r64 * stride_ik, idx, mask=row_ok)


@triton.jit
def _fullscan_small_kernel(
    X, Y, S, I,
    T, N, K,
    stride_xt, stride_xn, stride_yt, stride_yn,
    stride_st, stride_sk, stride_it, stride_ik,
    TILE_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Top-k of all N^2 sums for TILE_T tokens, all keys in registers (N < 128).

    Grid: (cdiv(T, TILE_T),).  BLOCK_E = next_pow2(N^2) >= N^2.  Round r takes the
    row max of the [TILE_T, BLOCK_E] key tile, writes its decoded score and index to
    column r, and knocks that position out.  Cost per token: k * BLOCK_E compares.
    Bytes: reads 2*TILE_T*N*b logits per program (gathered N times each, from cache),
    writes TILE_T*k*(b + 4).
    """
    pid = tl.program_id(0)
    rows = pid * TILE_T + tl.arange(0, TILE_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    keys = _load_keys(X, Y, rows64, row_ok, e, N, stride_xt, stride_xn, stride_yt, stride_yn)
    s_ptr = S + rows64 * stride_st
    i_ptr = I + rows64 * stride_it
    _emit_topk(keys, K, S, s_ptr, i_ptr, stride_sk, stride_ik, row_ok)


@triton.jit
def _fullscan_chunk_kernel(
    X, Y, W,
    T, N, KC, NCHUNK, M,
    stride_xt, stride_xn, stride_yt, stride_yn,
    CHUNK: tl.constexpr,
):
    """Top-KC keys of one chunk of CHUNK flat indices of one token (N >= 128).

    Grid: (T * NCHUNK,); program p handles token p // NCHUNK and flat indices
    [CHUNK * c, CHUNK * (c + 1)) with c = p % NCHUNK (a token's chunks run side by side,
    so its logits stay in L2).  Writes W[t, c*KC : (c+1)*KC] (rows of M = NCHUNK*KC),
    KC = min(k, CHUNK), sorted descending; slots beyond the chunk's real entries get
    _NONE.
    Bytes: reads 2*N*b logits of its token (from L2 after the first chunk), writes KC*8.
    """
    pid = tl.program_id(0)
    t = pid // NCHUNK
    c = pid - t * NCHUNK
    rows64 = tl.full((1,), 0, tl.int64) + t
    row_ok = rows64 < T
    e = c * CHUNK + tl.arange(0, CHUNK)
    keys = _load_keys(X, Y, rows64, row_ok, e, N, stride_xt, stride_xn, stride_yt, stride_yn)
    w_ptr = W + rows64 * M + c.to(tl.int64) * KC
    for r in range(loop_bound(KC)):
        m = tl.max(keys, axis=1)
        keys = tl.where(keys == m[:, None], _NONE, keys)
        tl.store(w_ptr + r, m, mask=row_ok)


@triton.jit
def _fullscan_merge_kernel(
    W, S, I,
    T, M, K,
    stride_st, stride_sk, stride_it, stride_ik,
    TILE_T: tl.constexpr, BLOCK_M: tl.constexpr, IN_REGISTERS: tl.constexpr,
):
    """Top-k of each row of the (T, M) candidate keys W; decode to scores and indices.

    Grid: (cdiv(T, TILE_T),).  IN_REGISTERS (M <= BLOCK_M): the rows are loaded once and
    k rounds of max + knock-out run in registers.  Otherwise (only when k is near N^2)
    each round streams the row in BLOCK_M pieces and takes the largest key below the
    previous pick; keys are unique, so "below the previous pick" is exactly "not yet
    picked".  Bytes: reads T*M*8 (k times over in the streaming case, from L2), writes
    T*k*(b + 4).
    """
    pid = tl.program_id(0)
    rows = pid * TILE_T + tl.arange(0, TILE_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    w_row = W + rows64 * M
    s_ptr = S + rows64 * stride_st
    i_ptr = I + rows64 * stride_it
    cols = tl.arange(0, BLOCK_M)
    if IN_REGISTERS:
        ok = row_ok[:, None] & (cols < M)[None, :]
        keys = tl.load(w_row[:, None] + cols[None, :], mask=ok, other=_NONE)
        _emit_topk(keys, K, S, s_ptr, i_ptr, stride_sk, stride_ik, row_ok)
    else:
        # Above every real key, so round 0 considers all of them.
        prev = tl.full((TILE_T,), 9223372036854775807, tl.int64)
        for r in range(loop_bound(K)):
            m = tl.full((TILE_T,), _NONE, tl.int64)
            for start in range(0, loop_bound(M), BLOCK_M):
                ok = row_ok[:, None] & ((start + cols) < M)[None, :]
                kv = tl.load(w_row[:, None] + (start + cols)[None, :], mask=ok, other=_NONE)
                kv = tl.where(kv < prev[:, None], kv, _NONE)
                m = tl.maximum(m, tl.max(kv, axis=1))
            prev = m
            s, idx = _decode_key(m)
            r64 = tl.cast(r, tl.int64)
            tl.store(s_ptr + r64 * stride_sk, to_dtype(s, S.dtype.element_ty), mask=row_ok)
            tl.store(i_ptr + r64 * stride_ik, idx, mask=row_ok)


# Register budget: a program keeps TILE_T * BLOCK keys (int64) live; 16-32 keys per
# thread keeps it out of local memory.
SPLIT_MIN_N = 128          # N >= this uses the chunk + merge kernels
MAX_KEYS_PER_PROGRAM = 16384
_TILE_KEYS = 4096          # keys per program the token tile is sized to


@dataclass(frozen=True)
class FullscanConfig:
    """Launch configuration of the full scan.

    split: the chunk + merge kernels (else one program holds all N^2 keys of its tokens).
    chunk: flat indices per chunk program (a power of two), when split.
    merge_block: the merge's register block (a power of two >= 16); candidates past it
        are merged in a streaming loop.
    """

    split: bool = False
    chunk: int = 4096
    merge_block: int = MAX_KEYS_PER_PROGRAM


def default_config(N: int) -> FullscanConfig:
    """The rule: split from N = 128 into chunks big enough that the workspace stays small
    and small enough to stay in registers."""
    chunk = max(4096, min(MAX_KEYS_PER_PROGRAM, triton.next_power_of_2(N * N) // 16))
    return FullscanConfig(split=N >= SPLIT_MIN_N, chunk=chunk)


def _warps(keys_per_program: int) -> int:
    if keys_per_program <= 2048:
        return 4
    if keys_per_program <= 4096:
        return 8
    return 16


def _token_tile(T: int, block: int) -> int:
    tile = max(1, min(64, _TILE_KEYS // block))
    return min(tile, triton.next_power_of_2(max(T, 1)))


def _check_config(config) -> FullscanConfig:
    if not isinstance(config, FullscanConfig):
        raise TypeError(f"config must be a FullscanConfig, got {type(config).__name__}")
    return with_fields(config, chunk=check_pow2("config.chunk", config.chunk, 1),
                       merge_block=check_pow2("config.merge_block", config.merge_block, 16))


def fullscan_router_forward(x, y, k, scores=None, indices=None, *,
                            config: FullscanConfig | None = None):
    """Launch the full-scan forward on (T, N) logits ``x``, ``y`` (any strides).

    Returns (scores (T, k) in x.dtype, indices (T, k) int32).  ``scores``/``indices``
    may be given preallocated (tests poison them first).  Arguments are assumed valid
    (``op.check_router_args`` checks user input).  ``config`` replaces
    ``default_config(N)`` (tests use it to reach every path at small sizes).
    """
    T, N = x.shape
    cfg = default_config(N) if config is None else _check_config(config)
    if scores is None:
        scores = torch.empty((T, k), dtype=x.dtype, device=x.device)
    if indices is None:
        indices = torch.empty((T, k), dtype=torch.int32, device=x.device)
    if scores.shape != (T, k) or scores.dtype != x.dtype:
        raise ValueError(f"scores must be a ({T}, {k}) {x.dtype} tensor, got "
                         f"{tuple(scores.shape)} {scores.dtype}")
    if indices.shape != (T, k) or indices.dtype != torch.int32:
        raise ValueError(f"indices must be a ({T}, {k}) int32 tensor, got "
                         f"{tuple(indices.shape)} {indices.dtype}")
    if T == 0 or k == 0:
        return scores, indices
    E = N * N
    strides = (x.stride(0), x.stride(1), y.stride(0), y.stride(1))
    out_strides = (scores.stride(0), scores.stride(1), indices.stride(0), indices.stride(1))

    if not cfg.split:
        block_e = max(16, triton.next_power_of_2(E))
        tile_t = _token_tile(T, block_e)
        _fullscan_small_kernel[(triton.cdiv(T, tile_t),)](
            x, y, scores, indices, T, N, k, *strides, *out_strides,
            TILE_T=tile_t, BLOCK_E=block_e, num_warps=_warps(tile_t * block_e),
        )
        return scores, indices

    chunk = cfg.chunk
    nchunk = triton.cdiv(E, chunk)
    kc = min(k, chunk)
    m = nchunk * kc
    work = torch.empty((T, m), dtype=torch.int64, device=x.device)
    _fullscan_chunk_kernel[(T * nchunk,)](
        x, y, work, T, N, kc, nchunk, m, *strides,
        CHUNK=chunk, num_warps=_warps(chunk),
    )
    block_m = max(16, triton.next_power_of_2(m))
    in_registers = block_m <= cfg.merge_block
    if not in_registers:
        block_m = cfg.merge_block
    tile_t = _token_tile(T, block_m)
    _fullscan_merge_kernel[(triton.cdiv(T, tile_t),)](
        work, scores, indices, T, m, k, *out_strides,
        TILE_T=tile_t, BLOCK_M=block_m, IN_REGISTERS=in_registers,
        num_warps=_warps(tile_t * block_m),
    )
    return scores, indices
