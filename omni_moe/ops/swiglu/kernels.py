"""Fused gated activation ("SwiGLU" for silu): out = act(gate) * up, and its backward.

The dense branch of an OmniMoE layer is W_down (act(W_gate h) * W_up h).  The three GEMMs
go to cuBLAS; what is left is an elementwise op that PyTorch runs as three kernels forward
(act, mul, and a cast under autocast) and more backward, each a round trip through HBM.
These kernels do it in one pass each way:

    forward:  read gate, up            write out               3 * M * I * b bytes
    backward: read dout, gate, up      write dgate, dup        5 * M * I * b bytes

The activation is recomputed in backward from ``gate`` (nothing extra is saved).  All math
is float32; stores round to the output dtype with ``to_dtype`` (RNE, also interpreted).

Activations (``ACT`` constexpr): 0 = silu  x * sigmoid(x)
                                  1 = gelu  0.5 * x * (1 + erf(x / sqrt 2))   (exact, as F.gelu)
                                  2 = relu  x if not x < 0 else 0             (NaN passes, as F.relu)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._activations import ACT_ID, act_fwd, act_fwd_bwd
from .._checks import check_pow2, with_fields
from .._triton import to_dtype, to_f32

@triton.jit
def _tile(M, I, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    # This program's (rows, int64 columns, mask) of the (M, I) grid of tiles.
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < M)[:, None] & (cols < I)[None, :]
    return rows, cols.to(tl.int64), mask


@triton.jit
def _load_tile(P, rows, cols64, mask, stride_r, stride_c):
    return tl.load(P + rows[:, None] * stride_r + cols64[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def _swiglu_fwd_kernel(
    GATE, UP, OUT,
    M, I,
    stride_gm, stride_gi, stride_um, stride_ui, stride_om,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """out[m, i] = act(float32(gate[m, i])) * float32(up[m, i]), rounded to out's dtype.

    Grid: (cdiv(M, BLOCK_M), cdiv(I, BLOCK_I)); each program owns one BLOCK_M x BLOCK_I
    tile and touches each element once.  Inputs may have any strides (e.g. the two
    column halves of one fused (M, 2I) projection); out is row-major with row stride
    stride_om.  Bytes: reads 2 * M * I * b, writes M * I * b.
    """
    rows, cols64, mask = _tile(M, I, BLOCK_M, BLOCK_I)
    g = _load_tile(GATE, rows, cols64, mask, stride_gm, stride_gi)
    u = _load_tile(UP, rows, cols64, mask, stride_um, stride_ui)
    out = act_fwd(to_f32(g), ACT) * to_f32(u)
    tl.store(OUT + rows[:, None] * stride_om + cols64[None, :],
             to_dtype(out, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DOUT, GATE, UP, DGATE, DUP,
    M, I,
    stride_dm, stride_di, stride_gm, stride_gi, stride_um, stride_ui,
    stride_dgm, stride_dum,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """dgate = dout * up * act'(gate),  dup = dout * act(gate)   (float32 math).

    Grid: (cdiv(M, BLOCK_M), cdiv(I, BLOCK_I)), one tile per program, each element read
    and written once; act(gate) is recomputed, not loaded.  dgate/dup are row-major.
    Bytes: reads 3 * M * I * b, writes 2 * M * I * b.
    """
    rows, cols64, mask = _tile(M, I, BLOCK_M, BLOCK_I)
    d = _load_tile(DOUT, rows, cols64, mask, stride_dm, stride_di)
    g = _load_tile(GATE, rows, cols64, mask, stride_gm, stride_gi)
    u = _load_tile(UP, rows, cols64, mask, stride_um, stride_ui)
    d = to_f32(d)
    a, da = act_fwd_bwd(to_f32(g), ACT)
    dg = d * to_f32(u) * da
    du = d * a
    tl.store(DGATE + rows[:, None] * stride_dgm + cols64[None, :],
             to_dtype(dg, DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + rows[:, None] * stride_dum + cols64[None, :],
             to_dtype(du, DUP.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class SwigluConfig:
    """Launch configuration of both kernels: BLOCK_M x BLOCK_I tiles (powers of two)."""

    block_m: int
    block_i: int
    warps: int


_TILE_ELEMS = 4096
_MAX_BLOCK_I = 1024


def default_config(M: int, I: int) -> SwigluConfig:
    """The rule: a tile of ~4K elements (16 per thread over 8 warps) keeps enough loads in
    flight to stream at HBM speed; rows are narrowed only when I is small so a program
    never sits mostly masked."""
    block_i = min(triton.next_power_of_2(max(I, 1)), _MAX_BLOCK_I)
    block_m = max(1, _TILE_ELEMS // block_i)
    block_m = min(block_m, triton.next_power_of_2(max(M, 1)))
    warps = 8 if block_m * block_i >= 4096 else 4
    return SwigluConfig(block_m=block_m, block_i=block_i, warps=warps)


def _check_config(config) -> SwigluConfig:
    if not isinstance(config, SwigluConfig):
        raise TypeError(f"config must be a SwigluConfig, got {type(config).__name__}")
    return with_fields(config, **{name: check_pow2(f"config.{name}", getattr(config, name))
                                  for name in ("block_m", "block_i", "warps")})


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, act: str, out: torch.Tensor | None = None,
                   *, config: SwigluConfig | None = None):
    """Launch the forward on 2-D (M, I) ``gate``/``up`` (any strides).

    ``out`` (row-major (M, I), unit column stride) may be given: tests poison it first.
    ``config`` replaces ``default_config(M, I)``.
    """
    M, I = gate.shape
    cfg = default_config(M, I) if config is None else _check_config(config)
    if out is None:
        out = torch.empty((M, I), dtype=gate.dtype, device=gate.device)
    if M == 0 or I == 0:
        return out
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(I, cfg.block_i))
    _swiglu_fwd_kernel[grid](
        gate, up, out, M, I,
        gate.stride(0), gate.stride(1), up.stride(0), up.stride(1), out.stride(0),
        ACT=ACT_ID[act], BLOCK_M=cfg.block_m, BLOCK_I=cfg.block_i, num_warps=cfg.warps,
    )
    return out


def swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str,
                    dgate: torch.Tensor | None = None, dup: torch.Tensor | None = None,
                    *, config: SwigluConfig | None = None):
    """Launch the backward on 2-D (M, I) tensors; returns row-major (dgate, dup)."""
    M, I = gate.shape
    cfg = default_config(M, I) if config is None else _check_config(config)
    if dgate is None:
        dgate = torch.empty((M, I), dtype=gate.dtype, device=gate.device)
    if dup is None:
        dup = torch.empty((M, I), dtype=up.dtype, device=up.device)
    if M == 0 or I == 0:
        return dgate, dup
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(I, cfg.block_i))
    _swiglu_bwd_kernel[grid](
        grad, gate, up, dgate, dup, M, I,
        grad.stride(0), grad.stride(1), gate.stride(0), gate.stride(1),
        up.stride(0), up.stride(1), dgate.stride(0), dup.stride(0),
        ACT=ACT_ID[act], BLOCK_M=cfg.block_m, BLOCK_I=cfg.block_i, num_warps=cfg.warps,
    )
    return dgate, dup
