"""Element offsets past 2^31 in every kernel (strided views into one big buffer).

The contract allows any strides.  A view whose largest element offset passes 2^31
overflows any index * stride product computed in int32: the wrapped address lands
before the buffer (a crash) or on the wrong element.  Each test builds such views in a
buffer of ~2^31 elements that is allocated but never filled (torch.empty: the pages
stay unmapped except those of the few addressed elements), so a test costs a few
megabytes of resident memory and ~4.3 GB of address space per bf16 buffer.

The oracle for addressing is the same op on contiguous copies of the inputs: the
arithmetic is the same, so results must agree bit for bit; float64 sanity checks show
the contiguous run itself is right.  On CUDA the same tests run with device buffers
(``@pytest.mark.gpu`` twins: ~4.3 GB of GPU memory per buffer).
"""

from __future__ import annotations

import pytest
import torch

from _tolerance import assert_close_ulps
from router_checks import force_expert_schedule, pruned_config

from conftest import HAS_CUDA, INTERPRET

LIMIT = 2**31
BF16 = torch.bfloat16


def far_views(T, n, count, dtype, device, seed, scale=1.0):
    """`count` (T, n) views with strides (1, S) into one buffer, S chosen so that the
    last column's offset passes 2^31; filled with seeded randn (only those elements)."""
    S = -(-(LIMIT + 1) // (n - 1))
    assert count * T <= S
    buf = torch.empty((n - 1) * S + count * T, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(seed)
    views = []
    for j in range(count):
        v = buf.as_strided((T, n), (1, S), j * T)
        v.copy_((torch.randn(T, n, generator=g) * scale).to(dtype))
        views.append(v)
    assert views[0].storage_offset() + (n - 1) * S >= LIMIT
    return views


def _same(a, b):
    a, b = a.detach().cpu(), b.detach().cpu()
    return a.shape == b.shape and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _devices():
    out = []
    if INTERPRET:
        out.append(pytest.param("cpu", id="cpu"))
    out.append(pytest.param("cuda", id="cuda", marks=pytest.mark.gpu))
    return out


@pytest.fixture(params=_devices())
def dev(request):
    if request.param == "cuda" and not HAS_CUDA:
        pytest.skip("needs CUDA")
    return request.param


# --------------------------------------------------------------------------- router


ROUTER_PATHS = [
    ("fullscan", None, 64, 8),
    ("fullscan-split", None, 128, 8),
    ("pruned-stream", {"kernel": "stream", "lpt": 2, "gsplit": True}, 64, 8),
    ("pruned-warp", {"kernel": "warp"}, 64, 8),
    ("pruned-warp-thresh", {"kernel": "warp", "thresh": True, "lm": 4}, 64, 8),
    ("large-k", {"kernel": "large_k", "emit_block": 32}, 64, 80),
    ("large-k-split-sort", {"kernel": "large_k", "sort": "split"}, 64, 80),
]


@pytest.mark.parametrize("name,config,N,k", ROUTER_PATHS, ids=[p[0] for p in ROUTER_PATHS])
def test_router_forward_far_offsets(name, config, N, k, dev):
    from omni_moe.ops.router.reference import router_bruteforce
    from omni_moe.ops.router.fullscan import FullscanConfig, fullscan_router_forward
    from omni_moe.ops.router.pruned import pruned_router_forward

    T = 2
    x, y = far_views(T, N, 2, BF16, dev, seed=N + k)
    s_far, = far_views(T, k, 1, BF16, dev, seed=1)  # scores stored with column stride ~2^31/(k-1)
    s_far.fill_(float("nan"))
    i_out = torch.full((T, k), -1, dtype=torch.int32, device=dev)
    if name.startswith("fullscan"):
        fullscan_router_forward(x, y, k, s_far, i_out)
        s_ref, i_ref = fullscan_router_forward(x.contiguous(), y.contiguous(), k)
    else:
        if name == "pruned-warp-thresh":
            from omni_moe.ops.router import pruned as opt
            assert opt.plan(T, N, k, BF16, x.device, pruned_config(T, N, k, config)).constants["AXIS_THRESH"]
        pruned_router_forward(x, y, k, s_far, i_out, config=pruned_config(T, N, k, config))
        s_ref, i_ref = pruned_router_forward(x.contiguous(), y.contiguous(), k,
                                             config=pruned_config(T, N, k, config))
    assert _same(s_far, s_ref) and torch.equal(i_out.cpu(), i_ref.cpu())
    bs, _ = router_bruteforce(x.cpu().contiguous(), y.cpu().contiguous(), k)
    assert _same(s_ref, bs)


@pytest.mark.parametrize("kernel", ["dense", "sort", "fixed"])
def test_router_backward_far_offsets(kernel, dev):
    from omni_moe.ops.router.backward import FixedBackwardConfig, SortBackwardConfig, router_backward

    T, N, k = 3, 16, 8
    cfg = {"dense": None, "sort": SortBackwardConfig(block=4, tile_t=2),
           "fixed": FixedBackwardConfig(block=4, tile_t=2)}[kernel]
    g, = far_views(T, k, 1, BF16, dev, seed=4)  # column stride ~3e8: r * stride passes 2^31
    gen = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(N * N, generator=gen)[:k] for _ in range(T)]).int().to(dev)
    dx, dy = router_backward(g, idx, N, config=cfg)
    rx, ry = router_backward(g.contiguous(), idx, N, config=cfg)
    assert torch.equal(dx.cpu(), rx.cpu()) and torch.equal(dy.cpu(), ry.cpu())
    # float64 oracle of the scatter (each output one rounding of an exact-ish sum).
    ex = torch.zeros(T, N, dtype=torch.float64)
    ey = torch.zeros(T, N, dtype=torch.float64)
    gi, ii = g.double().cpu(), idx.long().cpu()
    ex.scatter_add_(1, ii // N, gi)
    ey.scatter_add_(1, ii % N, gi)
    assert torch.equal(rx.cpu(), ex.to(BF16)) and torch.equal(ry.cpu(), ey.to(BF16))


# --------------------------------------------------------------------------- experts


@pytest.mark.parametrize("mode", ["token", "expert"])
def test_expert_far_offsets(mode, dev, monkeypatch):
    from omni_moe import omni_expert
    from omni_moe.ops.expert import kernels as kern

    T, H, E, k = 3, 8, 5, 8
    # hidden, grad_out, routing weights (T x 8) and up/down tables (E x 8) share a buffer.
    S = -(-(LIMIT + 1) // (H - 1))
    buf = torch.empty((H - 1) * S + 3 * T + 2 * E, dtype=BF16, device=dev)
    gen = torch.Generator().manual_seed(9)

    def view(rows, base, scale=1.0, shift=0.0):
        v = buf.as_strided((rows, H), (1, S), base)
        v.copy_((torch.randn(rows, H, generator=gen) * scale + shift).to(BF16))
        return v

    h, go, w = view(T, 0), view(T, T), view(T, 2 * T, 0.2, 1.0)
    up, down = view(E, 3 * T, 0.3), view(E, 3 * T + E)
    idx = torch.randint(0, E, (T, k), generator=gen).to(dev)

    def run(tensors):
        leaves = [t.detach().clone() if t.is_contiguous() else t.detach() for t in tensors[:4]]
        leaves = [t.requires_grad_() for t in leaves]
        out = omni_expert(*leaves, idx, "gelu")
        out.backward(tensors[4])
        return [out] + [t.grad for t in leaves]

    force_expert_schedule(monkeypatch, mode)
    far = run([h, up, down, w, go])
    near = run([t.contiguous() for t in (h, up, down, w, go)])
    for name, a, b in zip(("out", "dh", "dup", "ddown", "dw"), far, near):
        assert _same(a, b), name


def test_swiglu_far_offsets(dev):
    from omni_moe.ops.swiglu.kernels import swiglu_backward, swiglu_forward

    T, I = 3, 8
    gate, up, grad = far_views(T, I, 3, BF16, dev, seed=12)
    out = swiglu_forward(gate, up, "silu")
    ref = swiglu_forward(gate.contiguous(), up.contiguous(), "silu")
    assert _same(out, ref)
    dg, du = swiglu_backward(grad, gate, up, "silu")
    rg, ru = swiglu_backward(grad.contiguous(), gate.contiguous(), up.contiguous(), "silu")
    assert _same(dg, rg) and _same(du, ru)


@pytest.mark.parametrize("mode", ["none", "batch"])
def test_router_norm_far_offsets(mode, dev):
    from omni_moe.ops.router_norm.kernels import norm_log_softmax_backward, norm_log_softmax_forward

    T, N = 4, 8
    x, = far_views(T, 2 * N, 1, BF16, dev, seed=21)
    dpx, dpy = far_views(T, N, 2, BF16, dev, seed=22)

    def running():
        f = lambda: torch.zeros(N, dtype=torch.float32, device=dev)
        c = lambda: torch.zeros((), dtype=torch.int64, device=dev)
        return (f(), f() + 1, c(), f(), f() + 1, c())

    p, st = norm_log_softmax_forward(x, N, mode, running=running())
    pr, sr = norm_log_softmax_forward(x.contiguous(), N, mode, running=running())
    dx = norm_log_softmax_backward(dpx, dpy, pr, x, sr, N, mode)
    dr = norm_log_softmax_backward(dpx.contiguous(), dpy.contiguous(), pr, x.contiguous(), sr, N, mode)
    if dev == "cpu":
        assert _same(p, pr) and _same(st, sr) and _same(dx, dr)
    else:
        # Compiled, the row reductions (max, sum of exp) follow the register layout that
        # Triton picks from the loads' contiguity: a column-major view sums a row in
        # another order than the row-major copy, a few float32 ulps apart.  A wrong
        # address (the int32 wrap) is far outside these bounds.
        # log-probs: x - max - log(sum exp); a reordered float32 sum of 2N terms moves
        # log(sum) by at most ~2N unit roundoffs, absolutely.
        assert_close_ulps(p, pr, 8, torch.float32, extra=torch.full_like(pr, 4 * N * 2.0**-24),
                          name="log-probs")
        assert_close_ulps(st, sr, 16, torch.float32, name="statistics")
        assert_close_ulps(dx, dr, 1, x.dtype, name="dx")
    # float64 sanity of the contiguous run (mode "none": plain log-softmax per axis).
    if mode == "none":
        xd = x.double().cpu()
        ref = torch.cat([xd[:, :N].log_softmax(1), xd[:, N:].log_softmax(1)], 1)
        assert (pr.double().cpu() - ref).abs().max().item() < 1e-5
