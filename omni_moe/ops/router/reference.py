"""Reference omni routers in plain PyTorch.

The routers compute, per token t, the k largest of

    s[t, i*N + j] = float32(x[t, i]) + float32(y[t, j])

ordered by a total order on float32 values in which NaN ranks below every other value
(-inf included), ties broken towards the lower flat index.  Scores come back sorted
descending, rounded to the input dtype; indices are int32.

``router_bruteforce`` scans all N*N pairs: the test oracle (O(T*N^2) memory).  The
PyTorch path that CPU tensors use lives in ``cpu.py`` (``router_pruned``, the backward
``router_backward_reference``); they are re-exported here for older imports.
"""

from __future__ import annotations

import torch

from .cpu import _topk_by_key, ordered_key, router_backward_reference, router_pruned

__all__ = ["ordered_key", "product_key_topk", "router_backward_reference", "router_bruteforce",
           "router_product_key_topk", "router_pruned"]

def router_bruteforce(x: torch.Tensor, y: torch.Tensor, k: int):
    """Top-k over all N*N pairs.  Memory O(T*N^2): small sizes only."""
    T, N = x.shape
    s = (x.float()[:, :, None] + y.float()[:, None, :]).reshape(T, N * N)
    flat = torch.arange(N * N, device=x.device).expand(T, N * N)
    pos = _topk_by_key(s, flat, k)
    scores = s.gather(1, pos).to(x.dtype)
    return scores, pos.to(torch.int32)


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
