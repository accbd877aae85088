"""The large-k router: every k up to N^2 in O(T * (N + k)) memory.

- ``cpu.router_large_k`` (the PyTorch algorithm) against brute force on every input kind
  (ties, -inf masks, NaN of both signs, +inf rows, subnormals) at k = N - 1, N, N + 1,
  2N, odd k, N^2 - 1, N^2 for N power-of-two and not, in both orders;
- the Triton kernel (``large_k.py``, through Triton's interpreter without CUDA) bitwise
  equal to it, in both orders and every sort variant, on strided inputs and poisoned,
  strided outputs; the dispatch that sends k past the fast path to it;
- the sort-based backward kernel against the reference within its error bound,
  deterministic, in blocks;
- the public ``sorted=False`` option (eager, autograd, torch.compile), finite
  differences through the router, and the CPU path's memory: no intermediate near
  T x N^2 elements.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import HAS_CUDA
from omni_moe import omni_router
from omni_moe.ops.router import cpu as rc
from omni_moe.ops.router import large_k as lk
from omni_moe.ops.router import pruned as opt
from omni_moe.ops.router.backward import (
    BackwardConfig,
    FixedBackwardConfig,
    SortBackwardConfig,
    default_config as backward_config,
    router_backward,
)
from omni_moe.ops.router.large_k import LargeKConfig, large_k_router_forward
from omni_moe.ops.router.reference import ordered_key, router_backward_reference
from router_checks import (
    check_exact_topk,
    check_router_backward,
    make_logits,
    mixed_logits,
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _same(a, b):
    return a.shape == b.shape and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _ks(N):
    """k = N - 1, N, N + 1, 2N, an odd k, N^2 - 1, N^2 (those in [1, N^2])."""
    return sorted({k for k in (N - 1, N, N + 1, 2 * N, 2 * N + 1 + (N % 2), N * N - 1, N * N)
                   if 1 <= k <= N * N})


def check_unsorted_order(x, y, scores, indices):
    """The unsorted order: grouped by x row, the rows in x's key order (equal keys by
    column), each group a run of non-increasing score keys."""
    N = x.shape[1]
    xk = ordered_key(x.float().cpu())
    sk = ordered_key(scores.float().cpu())
    rows = (indices.long().cpu() // N)
    for t in range(x.shape[0]):
        r = rows[t].tolist()
        # x rank of each slot's row: (key desc, column asc) as a sortable tuple
        ranks = [(-xk[t, i].item(), i) for i in r]
        assert ranks == sorted(ranks), f"row {t}: groups not in x order"
        s = sk[t].tolist()
        for q in range(1, len(r)):
            if r[q] == r[q - 1]:
                assert s[q] <= s[q - 1], f"row {t}: a group is not descending at slot {q}"


# --------------------------------------------------------------------------- PyTorch path


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("N", [1, 2, 5, 8, 12, 17, 32])
def test_torch_large_k_is_exact(N, dtype):
    x, y = mixed_logits(N, dtype, "cpu", seed=N, per_kind=2)
    for k in _ks(N):
        s, i = rc.router_large_k(x, y, k)
        check_exact_topk(x, y, k, s, i)
        us, ui = rc.router_large_k(x, y, k, sorted=False)
        check_exact_topk(x, y, k, us, ui, sorted=False)
        # The same pairs in both orders, and the unsorted order is deterministic.
        assert torch.equal(ui.sort(1).values, i.sort(1).values)
        us2, ui2 = rc.router_large_k(x, y, k, sorted=False)
        assert torch.equal(ui, ui2) and _same(us, us2)
        check_unsorted_order(x, y, us, ui)


def inf_heavy_logits(T, N, dtype, device, seed):
    """Rows mostly of -inf, +inf and NaN (both signs), so that for most k the k-th pair
    is a -inf or NaN sum and every -inf + +inf = NaN pair matters."""
    g = torch.Generator().manual_seed(seed)
    inf, nan = float("inf"), float("nan")
    pool = torch.tensor([-inf, -inf, -inf, inf, inf, nan, -nan, 0.0, -0.0, 1.0, -2.0])
    x = pool[torch.randint(0, len(pool), (T, N), generator=g)]
    y = pool[torch.randint(0, len(pool), (T, N), generator=g)]
    return x.to(dtype).to(device), y.to(dtype).to(device)


def test_torch_large_k_infinities_every_k():
    """-inf + +inf is NaN: rows with x = -inf read y from past its +inf entries.  Every k
    on rows dense in +-inf and NaN, against brute force."""
    for N in (3, 4, 6):
        x, y = inf_heavy_logits(40, N, F32, "cpu", seed=N)
        for k in range(1, N * N + 1):
            for sorted_ in (True, False):
                check_exact_topk(x, y, k, *rc.router_large_k(x, y, k, sorted_), sorted=sorted_)


def test_kernel_infinities(device):
    """The kernel on the same rows (one tile), at k where the k-th pair is -inf or NaN
    for most rows: bitwise the PyTorch algorithm, and exact."""
    N = 6
    x, y = inf_heavy_logits(16, N, BF16, "cpu", seed=7)
    for k in (9, 20, 31):
        for sorted_ in (True, False):
            s, i = large_k_router_forward(x.to(device), y.to(device), k, sorted=sorted_)
            rs, ri = rc.router_large_k(x, y, k, sorted_)
            assert torch.equal(i.cpu(), ri) and _same(s.cpu(), rs)
            check_exact_topk(x, y, k, s, i, sorted=sorted_)


def adjacent_logits(T, N, seed):
    """float32 rows whose values are 1 + j ulp (x) and j * 2^-23 (y), j < 4: the sums
    are few adjacent keys (t, t + 1, ...), many tied -- a search that skips a key value
    or misreads a bracket end picks a wrong pair."""
    g = torch.Generator().manual_seed(seed)
    one = torch.tensor(1.0).view(torch.int32)
    x = (one + torch.randint(0, 4, (T, N), generator=g, dtype=torch.int32)).view(torch.float32)
    y = (one + torch.randint(0, 4, (T, N), generator=g, dtype=torch.int32)).view(torch.float32) - 1.0
    return x, y


def test_adjacent_keys(device):
    """Every k on rows of adjacent keys, both implementations (the kernel with and
    without the rectangle probe)."""
    N = 5
    x, y = adjacent_logits(64, N, seed=1)
    for k in range(1, N * N + 1):
        check_exact_topk(x, y, k, *rc.router_large_k(x, y, k))
    x, y = x[:16], y[:16]
    for k in (5, 9, 13, 18):
        for cfg in (None, LargeKConfig(first_probe=False, tile_t=16)):
            s, i = large_k_router_forward(x.to(device), y.to(device), k, config=cfg)
            check_exact_topk(x, y, k, s, i)


def test_torch_large_k_strided_and_empty():
    z = torch.randn(6, 2 * 9)
    x, y = z[:, :9], z[:, 9:]
    for k in (10, 81):
        s, i = rc.router_large_k(x, y, k)
        assert torch.equal(i, rc.router_large_k(x.contiguous(), y.contiguous(), k)[1])
        check_exact_topk(x, y, k, s, i)
    for T, k in ((0, 5), (3, 0)):
        s, i = rc.router_large_k(x[:T], y[:T], k)
        assert s.shape == (T, k) and i.shape == (T, k) and i.dtype == torch.int32


def test_cpu_rule_keeps_memory_linear():
    """router_cpu builds the full product (T x N^2) or the pruned grid (T x k'^2) only
    while that buffer is within MEMORY_FACTOR * T * (N + k) or SMALL_BUFFER elements."""
    for T in (16, 1024, 65536):
        for N in (8, 32, 64, 320):
            for k in (1, 8, 16, 64, 256, N, 2 * N, N * N // 2):
                if not 1 <= k <= N * N:
                    continue
                cap = max(rc.MEMORY_FACTOR * T * (N + k), rc.SMALL_BUFFER)
                if rc.use_full_product(T, N, k):
                    assert T * N * N <= cap
                if rc.use_pruned(T, N, k):
                    assert T * min(k, N) ** 2 <= cap
    assert not rc.use_full_product(4096, 320, 512) and not rc.use_pruned(4096, 320, 512)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("sorted_", [True, False])
def test_cpu_path_memory_is_linear(sorted_, monkeypatch):
    """Forward and backward on the PyTorch path at T = 128, N = 128, k = 512: no
    intermediate has more than 4 T (N + k) elements (the T x N^2 product: 6.4x that)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    T, N, k = 128, 128, 512
    x, y = make_logits(T, N, F32, "cpu", "randn", seed=3)
    x.requires_grad_()
    with _LargestTensor() as rec:
        s, i = omni_router(x, y, N, k, sorted=sorted_)
        s.backward(torch.ones_like(s))
    assert rec.largest <= 4 * T * (N + k) < T * N * N // 6, rec.largest
    check_exact_topk(x.detach(), y, k, s.detach(), i, sorted=sorted_)


def test_cpu_dispatch_past_the_small_k_rules(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = []
    real = rc.router_large_k
    monkeypatch.setattr(rc, "router_large_k", lambda x, y, k, sorted=True: calls.append(k) or real(x, y, k, sorted))
    x, y = make_logits(128, 128, BF16, "cpu", "ties", seed=1)
    # k = 16: the pruned grid; 300, 800: its 128^2 candidates would be over 16 (N + k).
    for k in (16, 300, 800):
        s, i = omni_router(x, y, 128, k)
        check_exact_topk(x, y, k, s, i)
    assert calls == [300, 800]


# ------------------------------------------------------------------------------ kernel

# (N, k, dtype, config fields, input layout): one call per order, a tile of mixed rows.
KERNEL_CASES = [
    (5, 25, F32, {}, "contiguous"),                              # k = N^2
    (8, 9, BF16, {}, "halves"),                                  # k = N + 1
    (12, 24, F16, {"sort": "split"}, "contiguous"),              # 2N, split sort kernel
    (17, 16, BF16, {"sort": "torch"}, "transposed"),             # N - 1, torch.sort
    (17, 288, F32, {"emit_block": 32, "tile_t": 8}, "contiguous"),  # N^2 - 1, 9 steps
    (32, 65, BF16, {"first_probe": False}, "halves"),            # odd k, plain bisection
    (32, 1024, BF16, {}, "contiguous"),                          # N^2 = 1024, fused sort
    (20, 7, F16, {"tile_t": 2, "warps": 1}, "contiguous"),       # k < N, small tiles
]


def _layout(x, y, layout):
    if layout == "halves":
        z = torch.cat([x, y], 1)
        return z[:, : x.shape[1]], z[:, x.shape[1]:]
    if layout == "transposed":
        return x.t().contiguous().t(), y.t().contiguous().t()
    return x, y


@pytest.mark.parametrize("N,k,dtype,fields,layout", KERNEL_CASES,
                         ids=[f"N{c[0]}-k{c[1]}-{str(c[2])[6:]}-{c[4]}-{c[3]}" for c in KERNEL_CASES])
def test_kernel_is_the_torch_algorithm(N, k, dtype, fields, layout, device):
    x, y = mixed_logits(N, dtype, "cpu", seed=N * 7 + k, per_kind=2)
    T = x.shape[0]
    xd, yd = _layout(x.to(device), y.to(device), layout)
    cfg = lk.LargeKConfig(**fields) if fields else None
    for sorted_ in (True, False):
        # Poisoned outputs; strided views for the sorted call.
        sbuf = torch.full((T, 2 * k), float("nan"), dtype=dtype, device=device)
        ibuf = torch.full((T, 2 * k), -1, dtype=torch.int32, device=device)
        s, i = (sbuf[:, ::2], ibuf[:, ::2]) if sorted_ else (sbuf[:, :k], ibuf[:, :k])
        out = large_k_router_forward(xd, yd, k, s, i, sorted=sorted_, config=cfg)
        assert out[0] is s and out[1] is i
        rs, ri = rc.router_large_k(x, y, k, sorted_)
        assert torch.equal(i.cpu(), ri), "indices differ from the PyTorch algorithm"
        assert _same(s.cpu(), rs)
        check_exact_topk(x, y, k, s, i, sorted=sorted_)


def test_kernel_empty_and_config_errors(device):
    x, y = make_logits(3, 8, BF16, device, "randn")
    for T, k in ((0, 5), (3, 0)):
        s, i = large_k_router_forward(x[:T], y[:T], k)
        assert s.shape == (T, k) and i.shape == (T, k) and i.dtype == torch.int32
    bad = [
        (LargeKConfig(tile_t=3), ValueError, "tile_t"),
        (LargeKConfig(emit_block=0), ValueError, "emit_block"),
        (LargeKConfig(sort="radix"), ValueError, "sort"),
        (LargeKConfig(sort_block=6), ValueError, "sort_block"),
        (LargeKConfig(progs_per_sm=0), ValueError, "progs_per_sm"),
        (LargeKConfig(warps=2.0), TypeError, "warps"),
        (LargeKConfig(first_probe=1), TypeError, "first_probe"),
        ({"tile_t": 1}, TypeError, "LargeKConfig"),
    ]
    for cfg, exc, match in bad:
        with pytest.raises(exc, match=match):
            large_k_router_forward(x, y, 20, config=cfg)
    wide = torch.zeros(1, 4097, dtype=BF16, device=device)
    with pytest.raises(ValueError, match="at most 4096"):
        large_k_router_forward(wide, wide, 300, config=LargeKConfig())


def test_dispatch_rules():
    """From k = LARGE_K_MIN_K (128) and past the fast path the rule names the large-k
    kernel while next_pow2(N) <= 4096, else nothing (a PyTorch algorithm)."""
    assert isinstance(opt.default_config(4096, 320, 512), LargeKConfig)
    assert isinstance(opt.default_config(4096, 320, 257), LargeKConfig)
    assert isinstance(opt.default_config(4096, 320, 128), LargeKConfig)
    assert not isinstance(opt.default_config(4096, 320, 127), LargeKConfig)
    assert isinstance(opt.default_config(16, 64, 16, kernel="large_k"), LargeKConfig)
    assert opt.default_config(8, 5000, 300) is None
    assert opt.use_large_k(5000, 16) is False and opt.use_large_k(4096, 300) is True
    for T, N, k in ((1024, 320, 4096), (16384, 320, 512), (7, 4096, 10**6)):
        cfg = lk.default_config(T, N, k, 9, True)
        launch = lk.plan(T, N, k, True, BF16, torch.device("cpu"), cfg)
        assert launch.num_tiles * launch.constants["TILE_T"] >= T


def test_public_router_past_the_fast_path(device, monkeypatch):
    """omni_router at k > 256 runs the large-k kernel (sorted and not); N > 4096 runs a
    PyTorch algorithm on the same device."""
    seen = []
    monkeypatch.setattr(opt, "large_k_router_forward",
                        lambda *a, **kw: seen.append(kw["sorted"]) or large_k_router_forward(*a, **kw))
    x, y = mixed_logits(17, BF16, device, seed=2, per_kind=2)
    for sorted_ in (True, False):
        s, i = omni_router(x, y, 17, 260, sorted=sorted_)
        check_exact_topk(x, y, 260, s, i, sorted=sorted_)
    assert seen == [True, False]
    xw, yw = make_logits(2, 4100, F32, device, "ties", seed=4)
    s, i = omni_router(xw, yw, 4100, 300, sorted=False)
    check_exact_topk(xw, yw, 300, s, i, sorted=False)


# ---------------------------------------------------------------------------- backward


@pytest.mark.parametrize("dtype,cfg", [
    (F32, SortBackwardConfig(block=16, tile_t=4)),        # k = 40: three blocks
    (BF16, SortBackwardConfig(tile_t=16)),
    (F16, SortBackwardConfig(block=64, tile_t=2, warps=1)),
    (F32, FixedBackwardConfig(block=16, tile_t=4)),
    (BF16, FixedBackwardConfig(tile_t=16)),
    (F16, FixedBackwardConfig(block=64, tile_t=2, warps=1, progs_per_sm=1)),
    (F32, FixedBackwardConfig(block=16, tile_t=4, runs=True)),
    (BF16, FixedBackwardConfig(block=64, tile_t=2, runs=True)),
], ids=["sort-f32-blocks", "sort-bf16", "sort-f16-tiles2", "fixed-f32-blocks", "fixed-bf16",
        "fixed-f16-tiles2", "fixed-runs-f32-blocks", "fixed-runs-bf16"])
def test_large_k_backward(dtype, cfg, device):
    """The sort and fixed-point kernels: within the float32 accumulation bound of the
    exact sums (neither sums in the reference's sequential order), every element written,
    deterministic, strided grads."""
    T, N, k = 9, 12, 40
    g = torch.Generator().manual_seed(k)
    idx = torch.stack([torch.randperm(N * N, generator=g)[:k] for _ in range(T)]).int().to(device)
    # Rows concentrated on a few grid rows/columns, like a router's staircase.
    idx[0] = torch.arange(k, dtype=torch.int32, device=device)
    gbuf = torch.randn(T, 2 * k, generator=g).to(dtype).to(device)
    grad = gbuf[:, ::2]
    dx = torch.full((T, N), float("nan"), dtype=dtype, device=device)
    dy = torch.full((T, N), float("nan"), dtype=dtype, device=device)
    router_backward(grad, idx, N, dx, dy, config=cfg)
    check_router_backward(grad, idx, N, dx, dy)
    dx2, dy2 = router_backward(grad, idx, N, config=cfg)
    assert torch.equal(dx, dx2) and torch.equal(dy, dy2)


def test_atomic_peer(device):
    """The benchmark's atomic-scatter backward (a peer, not a library path) computes the
    same gradients within the bound."""
    from omni_moe.bench.router import atomic_router_backward

    T, N, k = 5, 12, 50
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(N * N, generator=g)[:k] for _ in range(T)]).int().to(device)
    grad = torch.randn(T, k, generator=g).to(BF16).to(device)
    check_router_backward(grad, idx, N, *atomic_router_backward(grad, idx, N))


@pytest.mark.parametrize("order", ["grouped", "random"])
def test_fixed_backward_is_order_free(order, device):
    """The fixed-point kernel's integer sums: the same bits whatever the block size, the
    run summing and the order of a token's pairs; NaN and infinities flagged."""
    T, N, k = 6, 24, 300
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(T, N, generator=gen)
    y = torch.randn(T, N, generator=gen)
    # The unsorted large-k forward groups each token's pairs by x row (runs).
    idx = rc.router_large_k(x, y, k, sorted=False)[1]
    if order == "random":
        idx = idx.gather(1, torch.stack([torch.randperm(k, generator=gen) for _ in range(T)]))
    grad = torch.randn(T, k, generator=gen)
    grad[0, 3], grad[1, 5], grad[1, 6] = float("nan"), float("inf"), float("-inf")
    grad, idx = grad.to(device), idx.to(device)
    outs = [router_backward(grad, idx, N, config=FixedBackwardConfig(block=b, tile_t=t, runs=r))
            for b, t, r in ((16, 2, False), (64, 4, True), (512, 1, True), (512, 2, False))]
    words = [[o.cpu().view(torch.int32) for o in pair] for pair in outs]
    for w in words[1:]:
        assert torch.equal(w[0], words[0][0]) and torch.equal(w[1], words[0][1])
    # The same terms in another order within each token: still the same bits.
    perm = torch.stack([torch.randperm(k, generator=gen) for _ in range(T)]).to(device)
    again = router_backward(grad.gather(1, perm), idx.gather(1, perm), N, config=FixedBackwardConfig())
    assert torch.equal(again[0].cpu().view(torch.int32), words[0][0])
    ok = torch.isfinite(grad).all(1).cpu()
    check_router_backward(grad[ok], idx[ok], N, outs[0][0][ok], outs[0][1][ok])


def test_backward_config_errors():
    """A bad backward config raises, naming the field, before any launch; empty shapes
    return empty gradients."""
    g = torch.randn(3, 40)
    idx = torch.stack([torch.randperm(144)[:40] for _ in range(3)]).int()
    bad = [
        (FixedBackwardConfig(block=3), ValueError, "config.block"),
        (FixedBackwardConfig(tile_t=0), ValueError, "config.tile_t"),
        (FixedBackwardConfig(warps=3), ValueError, "config.warps"),
        (FixedBackwardConfig(progs_per_sm=0), ValueError, "config.progs_per_sm"),
        (FixedBackwardConfig(block=2.0), TypeError, "config.block"),
        (FixedBackwardConfig(runs=1), TypeError, "config.runs"),
        (SortBackwardConfig(block=1), ValueError, "config.block"),
        ({"block": 4}, TypeError, "BackwardConfig"),
    ]
    for cfg, exc, match in bad:
        with pytest.raises(exc, match=match):
            router_backward(g, idx, 12, config=cfg)
    dx, dy = router_backward(g[:0], idx[:0], 12, config=FixedBackwardConfig())
    assert dx.shape == (0, 12) and dy.shape == (0, 12)


def test_backward_rule():
    assert isinstance(backward_config(256, 16), BackwardConfig)
    assert isinstance(backward_config(320, 32), BackwardConfig)
    assert isinstance(backward_config(320, 64), SortBackwardConfig)
    assert isinstance(backward_config(320, 128), SortBackwardConfig)
    assert isinstance(backward_config(320, 129), FixedBackwardConfig)
    assert isinstance(backward_config(320, 4096), FixedBackwardConfig)
    assert isinstance(backward_config(16, 4096), BackwardConfig)  # dense: 16 columns


def test_autograd_through_large_k(device):
    """Gradients of the public router at k > 256 (the sort backward by the rule) equal
    the reference scatter of the same indices, within the bound."""
    N, k = 24, 300
    x, y = make_logits(6, N, F32, device, "randn", seed=9)
    x.requires_grad_()
    y.requires_grad_()
    s, i = omni_router(x, y, N, k, sorted=False)
    g = torch.randn(s.shape, generator=torch.Generator().manual_seed(1)).to(device)
    dx, dy = torch.autograd.grad(s, (x, y), g)
    check_router_backward(g, i, N, dx, dy)
    rx, ry = router_backward_reference(g.cpu(), i.cpu(), N)
    assert torch.allclose(dx.cpu(), rx, atol=1e-5) and torch.allclose(dy.cpu(), ry, atol=1e-5)


@pytest.mark.parametrize("where", ["torch", "kernel"])
def test_finite_differences(where, device, monkeypatch):
    """d/de sum(w * scores(x + e u, y + e v)) at e = 0 by central differences equals
    <dx, u> + <dy, v> from autograd (continuous inputs: the selection does not change)."""
    if where == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        device = "cpu"
    N, k = 16, 100
    gen = torch.Generator().manual_seed(11)
    x, y, u, v = (torch.randn(4, N, generator=gen, dtype=torch.float64).float().to(device) for _ in range(4))
    w = torch.randn(4, k, generator=gen).to(device)

    def f(e):
        s, i = omni_router(x + e * u, y + e * v, N, k, sorted=False)
        # Slots in a fixed order (by index), so that w meets the same pair each time.
        return (w * s.gather(1, i.long().argsort(1))).double().sum()

    xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
    s, i = omni_router(xl, yl, N, k, sorted=False)
    (w * s.gather(1, i.long().argsort(1))).sum().backward()
    analytic = float((xl.grad * u).sum() + (yl.grad * v).sum())
    eps = 1e-3
    numeric = float((f(eps) - f(-eps)) / (2 * eps))
    assert abs(numeric - analytic) <= 2e-2 * max(1.0, abs(analytic)), (numeric, analytic)


# ------------------------------------------------------------------- public API, compile


def test_sorted_argument_checked():
    x, y = make_logits(2, 4, F32, "cpu", "randn")
    for bad in (1, None, "yes"):
        with pytest.raises(TypeError, match="sorted"):
            omni_router(x, y, 4, 3, sorted=bad)
    with pytest.raises(TypeError):
        omni_router(x, y, 4, 3, False)  # keyword-only


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_unsorted(backend, monkeypatch):
    """The custom op carries ``sorted``: fullgraph compile, forward and backward, the
    same pairs as eager (PyTorch path)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()
    N, k = 16, 200

    def model(a, b):
        s, i = omni_router(a, b, N, k, sorted=False)
        return s.float().exp().sum(), i

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x, y = make_logits(5, N, F32, "cpu", "randn", seed=2)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    le, ie = model(xe, y)
    lc, ic = compiled(xc, y)
    assert torch.equal(ie, ic) and torch.equal(le, lc)
    le.backward()
    lc.backward()
    assert torch.equal(xe.grad, xc.grad)
    # The fake (meta) implementation agrees with the real one, with sorted=False too.
    op = torch.ops.omni_moe.router_forward.default
    torch.library.opcheck(op, (x, y, k, "pruned", False), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
def test_large_k_gpu_sizes():
    """On a GPU: the paper's shapes (N = 320) at T = 256, every sort variant, against
    brute force on sampled rows, and the backward kernels against the reference."""
    if not HAS_CUDA:
        pytest.skip("needs CUDA")
    from router_checks import check_router_output

    N = 320
    for k in (257, 320, 512, 1000, 4096, N * N):
        x, y = make_logits(256, N, BF16, "cuda", "ties" if k % 2 else "randn", seed=k)
        for cfg in (None, LargeKConfig(sort="fused"), LargeKConfig(sort="split"),
                    LargeKConfig(sort="torch"), LargeKConfig(tile_t=2)):
            for sorted_ in (True, False):
                s, i = large_k_router_forward(x, y, k, sorted=sorted_, config=cfg)
                if sorted_:
                    check_router_output(x, y, k, s, i)
                else:
                    check_exact_topk(x[:16], y[:16], k, s[:16], i[:16], sorted=False)
        g = torch.randn(256, k, device="cuda").to(BF16)
        for cfg in (None, SortBackwardConfig(), SortBackwardConfig(block=1024), FixedBackwardConfig(),
                    FixedBackwardConfig(block=4096, warps=8)):
            dx, dy = router_backward(g, i, N, config=cfg)
            check_router_backward(g, i, N, dx, dy)
