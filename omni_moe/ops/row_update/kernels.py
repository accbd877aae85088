"""Row-wise SGD and lazy-Adam updates of a dense (R, H) table from D distinct rows of
gradient, each row read and written once: no atomics, no scatter of a sparse tensor
into the table, no sort.

    SGD:   p[i] -= lr * g
    Adam:  m[i] += (g - m[i]) * (1 - beta1);  v[i] += (g^2 - v[i]) * (1 - beta2)
           p[i] -= step_size * m[i] / (sqrt(v[i]) + eps),
           step_size = lr * sqrt(1 - beta2^step) / (1 - beta1^step)

for every row i = rows[d] with gradient values[d] -- ``torch.optim.SparseAdam``'s lazy
Adam (the moments of a row move only on steps that update it), computed in float32 and
rounded once into each tensor's dtype.  ``rows`` must be distinct (a coalesced sparse
gradient's indices); the optimizers in ``omni_moe.optim`` coalesce first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._checks import check_betas, check_float, check_int, check_pow2, with_fields
from .._dispatch import use_triton
from .._triton import to_dtype, to_f32


@dataclass(frozen=True)
class RowUpdateConfig:
    """block: columns per program (power of two); warps: warps per program.  The default
    is not measured yet: 1024 columns (one program per row up to H = 1024) and 4 warps,
    8 bf16 columns a thread."""

    block: int = 1024
    warps: int = 4


@triton.jit
def _row_update_kernel(
    P, G, ROWS, M, V, H,
    stride_p, stride_g, stride_m, stride_v,
    lr, one_minus_beta1, one_minus_beta2, eps, step_size,
    ADAM: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid: (D, cdiv(H, BLOCK)); program (d, c) updates columns [c*BLOCK, (c+1)*BLOCK)
    of table row rows[d] (and its moment rows) from gradient row d.  Bytes: SGD reads
    D*H*(2b) and writes D*H*b; Adam reads D*H*(4b) and writes D*H*(3b)."""
    d = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    row = tl.load(ROWS + d).to(tl.int64)
    g = to_f32(tl.load(G + d * stride_g + cols, mask=mask, other=0.0))
    p = to_f32(tl.load(P + row * stride_p + cols, mask=mask, other=0.0))
    if ADAM:
        m = to_f32(tl.load(M + row * stride_m + cols, mask=mask, other=0.0))
        v = to_f32(tl.load(V + row * stride_v + cols, mask=mask, other=0.0))
        m = m + (g - m) * one_minus_beta1
        v = v + (g * g - v) * one_minus_beta2
        tl.store(M + row * stride_m + cols, to_dtype(m, M.dtype.element_ty), mask=mask)
        tl.store(V + row * stride_v + cols, to_dtype(v, V.dtype.element_ty), mask=mask)
        p = p - step_size * (m / (tl.sqrt(v) + eps))
    else:
        p = p - lr * g
    tl.store(P + row * stride_p + cols, to_dtype(p, P.dtype.element_ty), mask=mask)


def _torch_row_update(param, values, rows, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step_size):
    # The PyTorch path (CPU tensors): the kernel's float32 math on the gathered rows.
    g = values.float()
    p = param[rows].float()
    if exp_avg is None:
        param[rows] = (p - lr * g).to(param.dtype)
        return
    m = exp_avg[rows].float()
    v = exp_avg_sq[rows].float()
    m = m + (g - m) * (1 - beta1)
    v = v + (g * g - v) * (1 - beta2)
    exp_avg[rows] = m.to(exp_avg.dtype)
    exp_avg_sq[rows] = v.to(exp_avg_sq.dtype)
    param[rows] = (p - step_size * (m / (v.sqrt() + eps))).to(param.dtype)


def row_update(param: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, *, lr: float,
               exp_avg: torch.Tensor | None = None, exp_avg_sq: torch.Tensor | None = None,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, step: int = 1,
               config: RowUpdateConfig | None = None) -> None:
    """Update rows ``rows`` (D distinct int64 indices) of the (R, H) table ``param`` in
    place from the (D, H) gradient ``values``: SGD without moments, lazy Adam with
    ``exp_avg`` and ``exp_avg_sq`` (tables shaped like ``param``, updated in place; ``step``
    is the optimizer's step count after this step, >= 1).  One launch on Triton tensors;
    the PyTorch path on CPU tensors (module docstring)."""
    if (exp_avg is None) != (exp_avg_sq is None):
        raise ValueError("exp_avg and exp_avg_sq must be given together (Adam) or not at all (SGD)")
    if param.dim() != 2 or values.dim() != 2 or values.shape[1] != param.shape[1]:
        raise ValueError(f"param must be (R, H) and values (D, H), got {tuple(param.shape)} and "
                         f"{tuple(values.shape)}")
    if rows.shape != (values.shape[0],):
        raise ValueError(f"rows must be ({values.shape[0]},), got {tuple(rows.shape)}")
    if rows.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"rows must be int32 or int64, got {rows.dtype}")
    check_float("lr", lr, 0.0)
    adam = exp_avg is not None
    beta1, beta2 = check_betas(betas) if adam else betas
    if adam:
        check_float("eps", eps, 0.0)
        check_int("step", step, 1)
        for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            if t.shape != param.shape:
                raise ValueError(f"{name} must have param's shape {tuple(param.shape)}, got {tuple(t.shape)}")
    step_size = lr * (1 - beta2 ** step) ** 0.5 / (1 - beta1 ** step) if adam else 0.0
    D, H = values.shape
    if D == 0 or H == 0:
        return
    if not use_triton(param):
        _torch_row_update(param, values, rows, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step_size)
        return
    cfg = RowUpdateConfig() if config is None else _check_config(config)
    block = min(cfg.block, triton.next_power_of_2(H))
    for name, t in (("param", param), ("values", values), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t is not None and t.stride(1) != 1:
            raise ValueError(f"{name} must have unit column stride")
    m = exp_avg if adam else param
    v = exp_avg_sq if adam else param
    _row_update_kernel[(D, triton.cdiv(H, block))](
        param, values, rows, m, v, H,
        param.stride(0), values.stride(0), m.stride(0), v.stride(0),
        float(lr), float(1 - beta1), float(1 - beta2), float(eps), float(step_size),
        ADAM=adam, BLOCK=block, num_warps=cfg.warps,
    )


def _check_config(config) -> RowUpdateConfig:
    if not isinstance(config, RowUpdateConfig):
        raise TypeError(f"config must be a RowUpdateConfig, got {type(config).__name__}")
    return with_fields(config, block=check_pow2("config.block", config.block),
                       warps=check_pow2("config.warps", config.warps))
