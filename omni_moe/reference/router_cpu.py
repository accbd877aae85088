"""The omni router's PyTorch path (CPU tensors without ``TRITON_INTERPRET=1``).

Two exact algorithms with the same output, bit for bit (scores and indices, ties
included: equal sums go to the lower flat index, NaN ranks below -inf, scores are the
float32 sums rounded to nearest even into the input dtype):

``router_pruned`` (omni_moe.reference.router)
    per-axis top-k' by integer key, then the k' x k' candidate grid: O(N*k + k^2) work
    per token, but four key-sorts whose fixed costs dominate small grids.
``router_full_product``
    all N^2 float32 sums and one ``torch.topk`` on floats for k + 1 values, then a check
    that makes it exact: equal values inside the selection are put in flat-index order,
    and rows with a tie at the k-th value or a NaN sum (which ``torch.topk`` ranks
    first) are redone by integer keys (``router_bruteforce``).  O(N^2) memory per token,
    so it wins only while N^2 is small.

``router_cpu`` picks between them by ``use_full_product`` (a rule measured on CPU:
docs/cpu.md).
"""

from __future__ import annotations

import torch

from .router import ordered_key, router_bruteforce, router_pruned

# Largest N^2 at which the full product beats the pruned path on CPU (docs/cpu.md).
FULL_PRODUCT_MAX_GRID = 1024


def use_full_product(T: int, N: int, k: int) -> bool:
    """True when ``router_full_product`` is the faster exact CPU algorithm."""
    return N * N <= FULL_PRODUCT_MAX_GRID


def router_full_product(x: torch.Tensor, y: torch.Tensor, k: int):
    """Exact top-k of all N^2 sums through a float ``torch.topk``; same output as
    ``router_bruteforce``.  Memory O(T*N^2)."""
    T, N = x.shape
    if k == 0 or T == 0:
        return x.new_empty((T, k)), torch.empty((T, k), dtype=torch.int32, device=x.device)
    s = (x.float()[:, :, None] + y.float()[:, None, :]).reshape(T, N * N)
    # One value past the k-th: if it is smaller, no unselected sum ties the k-th value.
    kk = min(k + 1, N * N)
    vals, pos = s.topk(kk, dim=-1, sorted=True)
    # torch.topk ranks NaN above +inf (the contract: below -inf), so a row with a NaN sum
    # has one first; equal values come in no promised order.  One check covers both.
    tie = vals[:, 1:] == vals[:, :-1]
    nan = torch.isnan(vals[:, 0])
    if not bool(tie.any() | nan.any()):
        return vals[:, :k].to(x.dtype), pos[:, :k].to(torch.int32)
    vals, pos = vals[:, :k], pos[:, :k]
    # Ties inside the selection: order them by flat index (key order, as brute force).
    key = (ordered_key(vals) << 32) + ((2**31 - 1) - pos)
    order = key.argsort(dim=1, descending=True)
    scores = vals.gather(1, order).to(x.dtype)
    indices = pos.gather(1, order).to(torch.int32)
    # A tie at the k-th value (the choice among equal sums outside the selection) or a NaN:
    # those rows by integer keys.
    redo = nan
    if kk > k:
        redo = redo | tie[:, k - 1]
    if bool(redo.any()):
        rows = redo.nonzero().squeeze(1)
        rs, ri = router_bruteforce(x[rows], y[rows], k)
        scores[rows] = rs
        indices[rows] = ri
    return scores, indices


def router_cpu(x: torch.Tensor, y: torch.Tensor, k: int):
    """The CPU path: the faster of the two exact algorithms for this size."""
    T, N = x.shape
    if use_full_product(T, N, k):
        return router_full_product(x, y, k)
    return router_pruned(x, y, k)
