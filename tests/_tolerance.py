"""Per-element error bounds in ulps of the output dtype, against float64 oracles.

An output rounded once from an exact value is within 0.5 ulp of it; a float32
accumulation of n terms adds at most about n * 2^-24 * sum|terms| before that rounding
(``accumulation_bound``).  Tests pass the oracle in float64 and, where the kernel sums
in float32, the sum of the terms' magnitudes; the bound is then

    |actual - oracle| <= ulps * ulp(oracle) + n * 2^-24 * abs_sum   (element-wise)

and a failure names the worst element.  NaN must match NaN and infinities must match
exactly.
"""

from __future__ import annotations

import torch

_MANT = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7, torch.float64: 52}
_EMIN = {torch.float32: -126, torch.float16: -14, torch.bfloat16: -126, torch.float64: -1022}

U32 = 2.0**-24  # unit roundoff of float32


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |v| (float64; the subnormal spacing near zero)."""
    v = v.double().abs()
    m = _MANT[dtype]
    e = torch.floor(torch.log2(torch.where(v > 0, v, torch.ones_like(v))))
    e = torch.clamp(torch.where(v > 0, e, torch.full_like(e, _EMIN[dtype])), min=_EMIN[dtype])
    return torch.pow(2.0, e - m)


def accumulation_bound(n_terms, abs_sum: torch.Tensor) -> torch.Tensor:
    """Worst-case float32 summation error of n_terms terms whose magnitudes sum to abs_sum."""
    return max(int(n_terms) - 1, 0) * U32 * (1 + U32) ** max(int(n_terms), 1) * abs_sum.double()


def assert_close_ulps(actual, oracle_f64, ulps, dtype=None, extra=None, name="result"):
    """Assert |actual - oracle| <= ulps * ulp(oracle) (+ extra) for every element."""
    a = actual.detach().cpu().double()
    o = oracle_f64.detach().cpu().double()
    dtype = dtype or actual.dtype
    assert a.shape == o.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(o.shape)}"
    nan_a, nan_o = torch.isnan(a), torch.isnan(o)
    bad = nan_a != nan_o
    if bad.any():
        i = tuple(torch.nonzero(bad)[0].tolist())
        raise AssertionError(f"{name}: NaN mismatch at {i}: got {a[i].item()}, oracle {o[i].item()}")
    inf = torch.isinf(o) | torch.isinf(a)
    bad = inf & ~nan_o & (a != o)
    if bad.any():
        i = tuple(torch.nonzero(bad)[0].tolist())
        raise AssertionError(f"{name}: inf mismatch at {i}: got {a[i].item()}, oracle {o[i].item()}")
    fin = ~(nan_o | inf)
    tol = ulps * ulp(o, dtype)
    if extra is not None:
        tol = tol + extra.detach().cpu().double()
    err = torch.where(fin, (a - o).abs(), torch.zeros_like(o))
    ratio = torch.where(fin, err / torch.where(tol > 0, tol, torch.full_like(tol, 1e-300)),
                        torch.zeros_like(o))
    if a.numel() and ratio.max().item() > 1.0:
        i = tuple(torch.nonzero(ratio == ratio.max())[0].tolist())
        raise AssertionError(
            f"{name}: worst element {i}: got {a[i].item():.9g}, oracle {o[i].item():.9g}, "
            f"error {err[i].item():.3g} = {err[i].item() / ulp(o[i], dtype).item():.3g} ulp "
            f"> bound {tol[i].item():.3g} ({ulps} ulp{' + accumulation' if extra is not None else ''})")
