"""Shared input generators and the contract checker for router tests."""

from __future__ import annotations

import torch

from omni_moe.ops.router.reference import router_backward_reference, router_bruteforce

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_logits(T, N, dtype, device, kind="randn", seed=0):
    """Fresh (x, y) of one of several kinds.

    kind: randn | ties (small integers: many exactly equal sums) | masked (-inf masks,
    some rows fully masked) | nan (NaN sprinkled in, some rows all NaN) |
    halves (x, y the two column halves of one (T, 2N) tensor: non-contiguous) |
    transposed (column-major views).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "halves":
        z = torch.randn(T, 2 * N, generator=g).to(dtype).to(device)
        return z[:, :N], z[:, N:]
    if kind == "transposed":
        x = torch.randn(N, T, generator=g).to(dtype).to(device).t()
        y = torch.randn(N, T, generator=g).to(dtype).to(device).t()
        return x, y
    x = torch.randn(T, N, generator=g)
    y = torch.randn(T, N, generator=g)
    if kind == "ties":
        x = torch.randint(-3, 3, (T, N), generator=g).float()
        y = torch.randint(-3, 3, (T, N), generator=g).float()
    elif kind == "masked":
        x[torch.rand(T, N, generator=g) < 0.5] = float("-inf")
        y[torch.rand(T, N, generator=g) < 0.3] = float("-inf")
        if T > 1:
            x[0] = float("-inf")
        if T > 2:
            y[2, :] = float("-inf")
            x[2, : max(1, N // 2)] = float("-inf")
    elif kind == "nan":
        x[torch.rand(T, N, generator=g) < 0.1] = float("nan")
        y[torch.rand(T, N, generator=g) < 0.1] = float("nan")
        if T > 1:
            x[1] = float("nan")
    elif kind != "randn":
        raise ValueError(kind)
    return x.to(dtype).to(device), y.to(dtype).to(device)


def _same(a, b):
    """Value equality with NaN == NaN (the contract's 'bitwise' up to the sign of 0)."""
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def check_router_output(x, y, k, scores, indices, ref=None):
    """Assert (scores, indices) meet the contract for inputs (x, y).

    - shapes and dtypes;
    - indices in range and distinct per row;
    - every score equals the rounded sum its index addresses (consistency);
    - scores equal the brute-force top-k values (NaN ranking last), which with the two
      checks above implies the indices equal brute force's except among equal scores.
    """
    T, N = x.shape
    assert scores.shape == (T, k) and indices.shape == (T, k)
    assert scores.dtype == x.dtype and indices.dtype == torch.int32
    x, y = x.cpu(), y.cpu()
    scores, indices = scores.cpu(), indices.cpu()
    idx = indices.long()
    assert bool((idx >= 0).all()) and bool((idx < N * N).all()), "index out of range"
    if k > 1:
        srt = idx.sort(dim=1).values
        assert bool((srt[:, 1:] != srt[:, :-1]).all()), "duplicate index in a row"
    recomputed = (x.float().gather(1, idx // N) + y.float().gather(1, idx % N)).to(x.dtype)
    assert _same(scores, recomputed), "a score does not match its index"
    if ref is None:
        ref = router_bruteforce(x, y, k)
    ref_scores, _ = ref
    # Rows whose logits contain +inf may pair +inf with -inf (NaN): the choice there is
    # unspecified by the contract, only validity (checked above).
    pinf = torch.isposinf(x).any(1) | torch.isposinf(y).any(1)
    ok = ~pinf
    assert _same(scores[ok], ref_scores.cpu()[ok]), "scores differ from the brute-force top-k"


def check_router_backward(grad, indices, n, dx, dy):
    rdx, rdy = router_backward_reference(grad.cpu(), indices.cpu(), n)
    assert dx.dtype == grad.dtype and dy.dtype == grad.dtype
    assert torch.equal(dx.cpu(), rdx), "dx differs from the reference"
    assert torch.equal(dy.cpu(), rdy), "dy differs from the reference"
