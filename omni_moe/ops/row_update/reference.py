"""The row updates in float64: the oracle of the tests (``torch.optim.SparseAdam``'s lazy
Adam and SGD on the given rows, no rounding until the end)."""

from __future__ import annotations

import torch


def row_update_reference(param, values, rows, *, lr, exp_avg=None, exp_avg_sq=None,
                         betas=(0.9, 0.999), eps=1e-8, step=1):
    """(param, exp_avg, exp_avg_sq) after one update, float64 copies (moments None for SGD)."""
    p = param.double().clone()
    g = values.double()
    r = rows.long()
    if exp_avg is None:
        p[r] -= lr * g
        return p, None, None
    b1, b2 = betas
    m, v = exp_avg.double().clone(), exp_avg_sq.double().clone()
    m[r] = m[r] + (g - m[r]) * (1 - b1)
    v[r] = v[r] + (g * g - v[r]) * (1 - b2)
    step_size = lr * (1 - b2 ** step) ** 0.5 / (1 - b1 ** step)
    p[r] -= step_size * m[r] / (v[r].sqrt() + eps)
    return p, m, v
