"""Reference omni routers in plain PyTorch.

Both functions compute, per token t, the k largest of

    s[t, i*N + j] = float32(x[t, i]) + float32(y[t, j])

ordered by a total order on float32 values in which NaN ranks below every other value
(-inf included), ties broken towards the lower flat index.  Scores come back sorted
descending, rounded to the input dtype; indices are int32.

``router_bruteforce`` scans all N*N pairs (the test oracle; O(T*N^2) memory).
``router_pruned`` takes the top-k of each axis and then the top-k of the k*k grid of
their sums, which is exact (see docs/router.md); it is the PyTorch path that CPU
tensors use.
"""

from __future__ import annotations

import torch

_INT32_MIN = -(2**31)


def ordered_key(v: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int64 keys with the same order; NaN maps below -inf."""
    bits = v.contiguous().view(torch.int32).to(torch.int64)
    key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return torch.where(torch.isnan(v), torch.full_like(key, _INT32_MIN), key)


def _topk_by_key(values: torch.Tensor, flat_index: torch.Tensor, k: int):
    """Top-k along the last axis by (value desc, flat_index asc); returns positions."""
    key = (ordered_key(values) << 32) + ((2**31 - 1) - flat_index.to(torch.int64))
    return key.topk(k, dim=-1, sorted=True).indices


def router_bruteforce(x: torch.Tensor, y: torch.Tensor, k: int):
    """Top-k over all N*N pairs.  Memory O(T*N^2): small sizes only."""
    T, N = x.shape
    s = (x.float()[:, :, None] + y.float()[:, None, :]).reshape(T, N * N)
    flat = torch.arange(N * N, device=x.device).expand(T, N * N)
    pos = _topk_by_key(s, flat, k)
    scores = s.gather(1, pos).to(x.dtype)
    return scores, pos.to(torch.int32)


def router_pruned(x: torch.Tensor, y: torch.Tensor, k: int):
    """Exact top-k through per-axis top-k and the k'*k' grid (k' = min(k, N))."""
    T, N = x.shape
    kk = min(k, N)
    xf, yf = x.float(), y.float()
    axis = torch.arange(N, device=x.device).expand(T, N)
    ix = _topk_by_key(xf, axis, kk)
    iy = _topk_by_key(yf, axis, kk)
    s = (xf.gather(1, ix)[:, :, None] + yf.gather(1, iy)[:, None, :]).reshape(T, kk * kk)
    flat = (ix[:, :, None] * N + iy[:, None, :]).reshape(T, kk * kk)
    pos = _topk_by_key(s, flat, k)
    scores = s.gather(1, pos).to(x.dtype)
    return scores, flat.gather(1, pos).to(torch.int32)


def router_backward_reference(grad: torch.Tensor, indices: torch.Tensor, n: int):
    """dx[t,i] = sum_r grad[t,r]*[idx div n == i], dy likewise with mod; float32 sums."""
    T = grad.shape[0]
    g = grad.float()
    idx = indices.long()
    dx = torch.zeros(T, n, dtype=torch.float32, device=grad.device)
    dy = torch.zeros(T, n, dtype=torch.float32, device=grad.device)
    dx.scatter_add_(1, idx // n, g)
    dy.scatter_add_(1, idx % n, g)
    return dx.to(grad.dtype), dy.to(grad.dtype)


def router_product_key_topk(x: torch.Tensor, y: torch.Tensor, k: int):
    """The product-key trick as plain PyTorch code usually writes it (PEER, product-key
    memories): ``torch.topk`` on each axis, then on the k'*k' grid of sums.

    Same scores as ``router_pruned`` on inputs without NaN; its order among ties and its
    NaN handling are ``torch.topk``'s (NaN ranks first), not the contract's.  It is the
    benchmark's "what people write in PyTorch" baseline, not a library path.
    """
    scores, idx = product_key_topk(x.float(), y.float(), k)
    return scores.to(x.dtype), idx.to(torch.int32)


def product_key_topk(x: torch.Tensor, y: torch.Tensor, k: int):
    """``router_product_key_topk``'s steps in x's dtype: (scores, int64 flat indices),
    differentiable in x and y (the layer's float64 oracle routes with it)."""
    T, N = x.shape
    kk = min(k, N)
    sx, ix = x.topk(kk, dim=-1)
    sy, iy = y.topk(kk, dim=-1)
    s = (sx[:, :, None] + sy[:, None, :]).reshape(T, kk * kk)
    flat = (ix[:, :, None] * N + iy[:, None, :]).reshape(T, kk * kk)
    scores, pos = s.topk(k, dim=-1)
    return scores, flat.gather(1, pos)
