"""The omni router's PyTorch path (CPU tensors without ``TRITON_INTERPRET=1``).

Two exact algorithms under the router contract (docs/omni_router.md: NaN ranks below
-inf, scores are the float32 sums rounded to nearest even into the input dtype); their
scores are equal, and their indices too except among equal sums:

``router_pruned`` (``reference.py``)
    per-axis top-k' by integer key, then the k' x k' candidate grid: O(N*k + k^2) work
    per token, but four key-sorts whose fixed costs dominate small grids.
``router_full_product``
    bitwise ``router_bruteforce``'s output (equal sums go to the lower flat index): all
    N^2 float32 sums and one ``torch.topk`` on floats for k + 1 values, then a check
    that makes it exact: equal values inside the selection are put in flat-index order,
    and rows with a tie at the k-th value or a NaN sum (which ``torch.topk`` ranks
    first) are redone by integer keys (``router_bruteforce``).  O(N^2) memory per token,
    so it wins only while N^2 is small.

``router_cpu`` picks between them by ``use_full_product`` (a rule measured on CPU:
docs/cpu.md).
"""

from __future__ import annotations

import torch

from .reference import ordered_key, router_bruteforce, router_pruned

# Up to this many sums per call (T * N^2), the pruned path's fixed cost (four integer-key
# sorts) outweighs the full product's extra work while k is small (docs/cpu.md).
FULL_PRODUCT_MAX_SUMS = 2**16


def use_full_product(T: int, N: int, k: int, dtype: torch.dtype = torch.float32) -> bool:
    """True when ``router_full_product`` is the faster exact CPU algorithm (measured,
    docs/cpu.md).  float32 logits only: bf16 sums tie often (measured; fp16 is treated
    alike, unmeasured), and ties send rows to the slow exact fix-up.  Then: when the pruned candidate grid k'^2 (k' = min(k, N)) is at
    least half of N^2, pruning saves little; and at small calls with small k the pruned
    path's fixed cost dominates."""
    if dtype != torch.float32:
        return False
    kk = min(k, N)
    return 2 * kk * kk >= N * N or (T * N * N <= FULL_PRODUCT_MAX_SUMS and k <= 8)


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
        # Contiguous like the kernels' outputs (and the op's fake): a float32 ``.to`` of
        # the (T, k + 1) slice would be a strided view, which compiled graphs reject.
        return vals[:, :k].to(x.dtype).contiguous(), pos[:, :k].to(torch.int32)
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
    # The full product reads its data to check for ties (a host sync); meta tensors have
    # none, and the pruned path gives their shapes without reading any.
    if x.device.type != "meta" and use_full_product(T, N, k, x.dtype):
        return router_full_product(x, y, k)
    return router_pruned(x, y, k)
