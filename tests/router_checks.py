"""Shared input generators and the contract checker for router tests."""

from __future__ import annotations

import numpy as np
import torch

from _tolerance import accumulation_bound, assert_close_ulps

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


def oracle_topk(x, y, k, rows=None):
    """Top-k values of the float32 sums x[t, i] + y[t, j] (NaN last, ties to the lower
    flat index), written independently of the package: numpy float64 sums rounded to
    float32, one stable argsort per row.  Returns (values float64 (R, k), flat int64 (R, k))
    for the rows `rows` (default all)."""
    xs = x.detach().cpu().double().numpy()
    ys = y.detach().cpu().double().numpy()
    rows = range(xs.shape[0]) if rows is None else rows
    vals, flats = [], []
    for t in rows:
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, float32 overflow
            s = (xs[t][:, None] + ys[t][None, :]).astype(np.float32).astype(np.float64).ravel()
        # Ascending stable sort of -s: descending values, NaN last (numpy sorts NaN to
        # the end), equal values in flat-index order.
        order = np.argsort(-s, kind="stable")[:k]
        vals.append(s[order])
        flats.append(order)
    shape = (len(vals), k)
    return (torch.from_numpy(np.array(vals, dtype=np.float64).reshape(shape)),
            torch.from_numpy(np.array(flats, dtype=np.int64).reshape(shape)))


# Rows checked against the oracle when a case is large (T * N^2 above this).
_ORACLE_ELEMS = 1 << 21


def _check_consistent(x, y, k, scores, indices):
    """Shapes and dtypes, indices in range and distinct per row, every score the rounded
    sum its index addresses; returns the CPU tensors and the int64 indices."""
    T, N = x.shape
    assert scores.shape == (T, k) and indices.shape == (T, k)
    assert scores.dtype == x.dtype and indices.dtype == torch.int32
    x, y, scores, indices = x.cpu(), y.cpu(), scores.cpu(), indices.cpu()
    idx = indices.long()
    assert bool((idx >= 0).all()) and bool((idx < N * N).all()), "index out of range"
    if k > 1:
        srt = idx.sort(dim=1).values
        assert bool((srt[:, 1:] != srt[:, :-1]).all()), "duplicate index in a row"
    recomputed = (x.float().gather(1, idx // N) + y.float().gather(1, idx % N)).to(x.dtype)
    assert _same(scores, recomputed), "a score does not match its index"
    return x, y, scores, indices, idx


def check_router_output(x, y, k, scores, indices, rows=None):
    """Assert (scores, indices) meet the contract for inputs (x, y).

    - shapes and dtypes;
    - indices in range and distinct per row;
    - every score equals the rounded sum its index addresses (consistency);
    - scores equal the independent oracle's top-k values rounded to the input dtype
      (NaN ranking last), which with the two checks above implies the indices equal
      the oracle's except among equal scores.  Large cases check sampled rows.
    """
    T, N = x.shape
    x, y, scores, indices, idx = _check_consistent(x, y, k, scores, indices)
    if rows is None:
        if T * N * N > _ORACLE_ELEMS:
            g = torch.Generator().manual_seed(T * 7 + N + k)
            rows = sorted(set(torch.randint(0, T, (32,), generator=g).tolist()) | {0, T - 1})
        else:
            rows = list(range(T))
    if T == 0 or k == 0:
        return
    ref_vals, _ = oracle_topk(x, y, k, rows)
    # Rows whose logits contain +inf may pair +inf with -inf (NaN): the choice there is
    # unspecified by the contract, only validity (checked above).
    pinf = (torch.isposinf(x).any(1) | torch.isposinf(y).any(1))[rows]
    ok = ~pinf
    got = scores[rows]
    assert _same(got[ok], ref_vals.to(torch.float32).to(x.dtype)[ok]), \
        "scores differ from the brute-force top-k"


def backward_oracle(grad, indices, n):
    """(dx, dy, |g| sums) in float64: the scatter of g written as a dense product."""
    idx = indices.detach().cpu().long()
    g = grad.detach().cpu().double()
    ox = torch.nn.functional.one_hot(idx // n, n).double()
    oy = torch.nn.functional.one_hot(idx % n, n).double()
    dx = torch.einsum("tk,tkn->tn", g, ox)
    dy = torch.einsum("tk,tkn->tn", g, oy)
    ax = torch.einsum("tk,tkn->tn", g.abs(), ox)
    ay = torch.einsum("tk,tkn->tn", g.abs(), oy)
    return dx, dy, ax, ay


def check_router_backward(grad, indices, n, dx, dy):
    """dx, dy against the float64 oracle: float32 sums of <= k terms, rounded once to
    the gradient's dtype (0.5 ulp + the accumulation bound)."""
    assert dx.dtype == grad.dtype and dy.dtype == grad.dtype
    ox, oy, ax, ay = backward_oracle(grad, indices, n)
    k = indices.shape[1]
    assert_close_ulps(dx, ox, 0.5, grad.dtype, accumulation_bound(k, ax), "dx")
    assert_close_ulps(dy, oy, 0.5, grad.dtype, accumulation_bound(k, ay), "dy")


def pruned_config(T, N, k, spec):
    """A pruned-router launch config from a test spec: None or {} = the default rule;
    else the named kernel's rule (or the default's) with the given fields replaced.  The
    launch then takes exactly that kernel and stage (``plan`` raises otherwise)."""
    from dataclasses import replace

    from omni_moe.ops.router import pruned

    if not spec:
        return None
    fields = {key: v for key, v in spec.items() if key != "kernel"}
    return replace(pruned.default_config(T, N, k, kernel=spec.get("kernel")), **fields)


def force_expert_schedule(monkeypatch, schedule=None, **fields):
    """Make the expert op's launch rule pick ``schedule`` ("token", "expert" or "rows"; None: the
    rule's own) and the other ``ExpertConfig`` ``fields`` given (tiles)."""
    from dataclasses import replace

    from omni_moe.ops.expert import kernels

    if schedule is not None:
        fields["schedule"] = schedule
    rule = kernels.default_config
    monkeypatch.setattr(kernels, "default_config",
                        lambda *a, **kw: replace(rule(*a, **kw), **fields))



# Raw words of special values per dtype: (word bits, signed integer dtype of that width).
_WORDS = {torch.float32: (32, torch.int32), torch.float16: (16, torch.int16),
          torch.bfloat16: (16, torch.int16)}


def special_values(dtype) -> torch.Tensor:
    """NaN of both signs (quiet and signalling), +-inf, +-0, +-smallest and largest
    subnormal, +-largest finite and a few ordinary values, built from raw words (a float
    conversion gives bfloat16 only one NaN pattern)."""
    bits, itype = _WORDS[dtype]
    m = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]
    inf = ((1 << (bits - 1 - m)) - 1) << m
    pos = [inf | (1 << (m - 1)), inf | 1, inf, 0, 1, (1 << m) - 1, inf - 1]
    words = pos + [w | (1 << (bits - 1)) for w in pos]
    words = [w - (1 << bits) if w >= 1 << (bits - 1) else w for w in words]
    special = torch.tensor(words, dtype=torch.int64).to(itype).view(dtype)
    ordinary = torch.tensor([1.0, -1.0, 2.0, -3.0, 0.5]).to(dtype)
    return torch.cat([special, ordinary])


def mixed_logits(N, dtype, device, seed, per_kind=3):
    """(T, N) x, y whose rows mix every input kind: randn, ties (small integers), -inf
    masks, NaN, and rows drawn from ``special_values`` (with and without +inf, every
    sign of NaN, subnormals, overflowing sums)."""
    xs, ys = [], []
    for j, kind in enumerate(("randn", "ties", "masked", "nan")):
        x, y = make_logits(per_kind, N, dtype, "cpu", kind, seed=seed + j)
        xs.append(x)
        ys.append(y)
    g = torch.Generator().manual_seed(seed)
    vals = special_values(dtype)
    finite = vals[~torch.isinf(vals.float())]
    for pool in (vals, finite, vals):
        xs.append(pool[torch.randint(0, len(pool), (per_kind, N), generator=g)])
        ys.append(pool[torch.randint(0, len(pool), (per_kind, N), generator=g)])
    return torch.cat(xs).to(device), torch.cat(ys).to(device)


def check_exact_topk(x, y, k, scores, indices, sorted=True):
    """The contract, exactly, on every row (rows with +inf included, which
    ``check_router_output`` checks only for validity): indices valid and distinct, each
    score the rounded sum of its index, and the scores -- sorted descending, or as a
    multiset when not ``sorted`` -- equal to brute force's top-k (NaN ranking last)."""
    from omni_moe.ops.router.reference import ordered_key, router_bruteforce

    x, y, scores, indices, _ = _check_consistent(x, y, k, scores, indices)
    ref, _ = router_bruteforce(x, y, k)
    got = scores
    if not sorted:
        # Key order of the rounded scores (NaN lowest), as a multiset.
        got = got.float().gather(1, ordered_key(got.float()).argsort(dim=1, descending=True, stable=True))
        got = got.to(x.dtype)
    assert _same(got, ref), "scores differ from the brute-force top-k"
