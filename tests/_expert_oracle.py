"""float64 oracle of the atomic-expert op with per-element error budgets.

Written from the formulas, independently of ``omni_moe.ops.expert`` (its ``cpu.py`` path and
``reference.py`` oracle):

    a[t, r]   = up[e] . h[t]            e = idx[t, r]
    out[t]    = sum_r w[t, r] act(a[t, r]) down[e]
    g[t, r]   = down[e] . go[t]
    da[t, r]  = act'(a) w g
    dh[t]     = sum_r da[t, r] up[e]
    dup[e]    = sum_{(t, r) -> e} da[t, r] h[t]
    ddown[e]  = sum_{(t, r) -> e} w act(a) go[t]
    dw[t, r]  = act(a) g

Alongside each result it returns a magnitude M (same shape): the sum of the absolute
values of everything that enters the result, including how far a float32 error in a or
g can move act(a) and act'(a) (|act''| <= 1 for SiLU/GELU), and the absolute
float32 error of act itself (a few ulps of |a|, of 1 for act').  A kernel that works in
float32 and rounds once is then within 0.5 ulp + 2 * n * 2^-24 * M of the oracle, n the
longest chain of float32 operations (dot length + terms summed + a few for act).
"""

from __future__ import annotations

import math

import torch


def _act(a, act):
    if act == "silu":
        s = torch.sigmoid(a)
        return a * s, s * (1 + a * (1 - s))
    if act == "gelu":
        cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2.0)))
        return a * cdf, cdf + a * torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    z = torch.clamp(a, min=0.0)
    return z, (a > 0).double()


def expert_oracle(h, up, down, w, idx, go, act):
    """((out, dh, dup, ddown, dw), (magnitudes...), n_ops) in float64."""
    h, up, down, w, go = (t.detach().cpu().double() for t in (h, up, down, w, go))
    idx = idx.detach().cpu().long()
    T, H = h.shape
    E = up.shape[0]
    k = idx.shape[1]
    ok = (idx >= 0) & (idx < E)
    e = torch.where(ok, idx, torch.zeros_like(idx))
    okd = ok.double()
    u, v = up[e], down[e]  # (T, k, H)
    a = torch.einsum("th,tkh->tk", h, u)
    sa = torch.einsum("th,tkh->tk", h.abs(), u.abs())
    z, dz = _act(a, act)
    curv = 0.0 if act == "relu" else 1.0
    g = torch.einsum("th,tkh->tk", go, v)
    sg = torch.einsum("th,tkh->tk", go.abs(), v.abs())
    wz = w * z * okd
    # act(a) in float32 is accurate to a few ulps of |a| (GELU's 1 + erf(x) cancels for
    # x << 0), not of |act(a)|; plus act's sensitivity to a's own float32 error.
    mz = (z.abs() + a.abs() + dz.abs() * sa) * okd
    dzm = dz.abs() + 1.0  # likewise act'(a) is accurate to a few ulps of 1
    out = torch.einsum("tk,tkh->th", wz, v)
    m_out = torch.einsum("tk,tkh->th", w.abs() * mz, v.abs())
    da = dz * w * g * okd
    m_da = w.abs() * (dzm * sg + curv * sa * g.abs() + dzm * g.abs()) * okd
    dh = torch.einsum("tk,tkh->th", da, u)
    m_dh = torch.einsum("tk,tkh->th", m_da, u.abs())
    flat = e.reshape(-1)
    dup = torch.zeros(E, H, dtype=torch.float64).index_add_(0, flat, (da[:, :, None] * h[:, None, :]).reshape(-1, H))
    m_dup = torch.zeros(E, H, dtype=torch.float64).index_add_(
        0, flat, (m_da[:, :, None] * h.abs()[:, None, :]).reshape(-1, H))
    ddown = torch.zeros(E, H, dtype=torch.float64).index_add_(0, flat, (wz[:, :, None] * go[:, None, :]).reshape(-1, H))
    m_ddown = torch.zeros(E, H, dtype=torch.float64).index_add_(
        0, flat, ((w.abs() * mz)[:, :, None] * go.abs()[:, None, :]).reshape(-1, H))
    dw = z * g * okd
    m_dw = (mz * g.abs() + z.abs() * sg) * okd
    n_ops = H + T * k + 16
    return (out, dh, dup, ddown, dw), (m_out, m_dh, m_dup, m_ddown, m_dw), n_ops
