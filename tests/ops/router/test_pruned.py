"""Tests of the pruned omni router: both kernels, their launch configs, the shared backward.

Every forward result is checked against brute force (router_checks.check_router_output:
values equal to the brute-force top-k, indices valid, distinct and consistent with the
scores) and, where it imports, against the original full-scan router.  Without CUDA the
kernels run through Triton's interpreter at small sizes (TRITON_INTERPRET=1); larger
sizes (N up to 1024, T up to 65536) and the timing tables need a GPU.

    pytest tests/ops/router/test_pruned.py::test_router_correctness -s
    pytest tests/ops/router/test_pruned.py::test_router_forward_comparison -s
"""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA
from dataclasses import replace

from omni_moe import omni_router as triton_omni_router_func_optimized
from omni_moe.ops.router import backward as rb
from omni_moe.ops.router import pruned as opt
from omni_moe.ops.router.backward import BackwardConfig, router_backward
from omni_moe.ops.router.fullscan import fullscan_router_forward
from omni_moe.ops.router.op import route
from omni_moe.ops.router import large_k
from omni_moe.ops.router.large_k import LargeKConfig
from omni_moe.ops.router.pruned import StreamConfig, WarpConfig, pruned_router_forward
from omni_moe.ops.router.reference import router_backward_reference, router_pruned
from router_checks import check_router_backward, check_router_output, make_logits


def triton_omni_router_func(x, y, n, k):
    return route(x, y, n, k, "fullscan")


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
WARP = {"kernel": "warp"}
# The default picks the warp kernel below STREAM_MIN_T tokens; small cases name the
# streaming kernel explicitly so that the interpreter runs both.
STREAM = {"kernel": "stream"}


def _config(T, N, k, spec):
    """A launch config from a test spec: {} = the default rule; else the named kernel's
    rule (or the default's) with the given fields replaced."""
    if not spec:
        return None
    fields = {key: v for key, v in spec.items() if key != "kernel"}
    return replace(opt.default_config(T, N, k, kernel=spec.get("kernel")), **fields)


# (T, N, k, kind, dtype, config): small enough for the interpreter.
CASES = [
    (5, 64, 16, "randn", BF16, STREAM),
    (5, 64, 16, "randn", BF16, WARP),
    (4, 64, 16, "ties", F32, STREAM),
    (4, 64, 16, "ties", F32, WARP),
    (6, 37, 5, "masked", F16, STREAM),
    (6, 37, 5, "masked", F16, WARP),
    (4, 100, 7, "nan", BF16, STREAM),
    (4, 100, 7, "nan", F32, {"kernel": "warp", "thresh": True}),
    (3, 64, 16, "halves", BF16, {"kernel": "stream", "lpt": 1, "gsplit": False}),
    (3, 48, 8, "transposed", F32, {"kernel": "stream", "lpt": 2, "gsplit": False}),
    (3, 256, 16, "ties", BF16, {"kernel": "warp", "thresh": True, "tile_t": 2, "warps": 2}),
    (3, 256, 32, "nan", F16, {}),
    (3, 16, 1, "randn", F32, STREAM),
    (4, 33, 3, "masked", BF16, {}),
    (4, 33, 3, "ties", BF16, STREAM),
    (3, 8, 64, "ties", BF16, {}),  # k > N
    (2, 4, 16, "nan", F32, {}),  # k = N^2
    (2, 3, 9, "ties", F16, {}),  # k = N^2, odd N
    (3, 1, 1, "nan", BF16, {}),
    (2, 1000, 16, "randn", BF16, STREAM),
    (2, 1000, 16, "ties", F16, {}),
    (2, 512, 32, "masked", F32, {"kernel": "warp", "thresh": True}),
    (2, 16, 256, "randn", F32, {}),  # k = N^2 = 256: largest fast-path k
    (2, 32, 300, "ties", BF16, {}),  # k > 256: the large-k kernel
]

# Larger shapes, CUDA only.
GPU_CASES = [
    (4096, 256, 16, "randn", BF16, {}),
    (4096, 256, 16, "randn", BF16, STREAM),
    (4096, 256, 16, "ties", BF16, {}),
    (4096, 256, 16, "nan", F32, {}),
    (1024, 1024, 16, "masked", BF16, {}),
    (1000, 1000, 32, "randn", BF16, {}),
    (65536, 256, 16, "randn", BF16, {}),
    (65536, 256, 16, "randn", BF16, WARP),
    (16384, 256, 16, "halves", BF16, {}),
    (4096, 1024, 16, "transposed", F16, {}),
    (2048, 512, 64, "ties", BF16, {}),
    (1024, 64, 256, "randn", BF16, {}),
    (3000, 100, 5, "nan", F16, {}),
]


def _run(x, y, k, config, strided_out=False):
    """Forward into poisoned preallocated outputs (optionally strided views)."""
    T = x.shape[0]
    if strided_out:
        sbuf = torch.full((T, 2 * k + 1), float("nan"), dtype=x.dtype, device=x.device)
        ibuf = torch.full((T, 2 * k + 1), -1, dtype=torch.int32, device=x.device)
        s, i = sbuf[:, 1:2 * k + 1:2], ibuf[:, 1:2 * k + 1:2]
    else:
        s = torch.full((T, k), float("nan"), dtype=x.dtype, device=x.device)
        i = torch.full((T, k), -1, dtype=torch.int32, device=x.device)
    cfg = _config(T, x.shape[1], k, config)
    if cfg is not None:  # the launch takes the requested kernel and stage
        launch = opt.plan(T, x.shape[1], k, x.dtype, x.device, cfg)
        assert launch.kernel == ("stream" if isinstance(cfg, StreamConfig) else "warp")
        if isinstance(cfg, WarpConfig):
            assert launch.constants["AXIS_THRESH"] == cfg.thresh
            assert launch.constants["GRID"] == cfg.grid
    out = pruned_router_forward(x, y, k, s, i, config=cfg)
    assert out[0] is s and out[1] is i
    return s, i


def _same(a, b):
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _check_case(T, N, k, kind, dtype, config, device, seed, big=False):
    x, y = make_logits(T, N, dtype, device, kind, seed=seed)
    s, i = _run(x, y, k, config, strided_out=(seed % 3 == 0))
    check_router_output(x, y, k, s, i)
    # Bitwise determinism: a second call gives the same indices and scores.
    s2, i2 = _run(x, y, k, config)
    assert torch.equal(i, i2) and _same(s, s2)
    # The original full-scan router finds the same values (its ties may differ).
    if not big or T * N * N <= (1 << 26):
        fs, fi = fullscan_router_forward(x, y, k)
        pinf = (torch.isposinf(x).any(1) | torch.isposinf(y).any(1)).cpu()
        assert _same(fs.cpu()[~pinf], s.cpu()[~pinf]), "differs from the full-scan router"


@pytest.mark.parametrize("T,N,k,kind,dtype,config", CASES,
                         ids=[f"{c[0]}x{c[1]}k{c[2]}-{c[3]}-{str(c[4])[6:]}-{c[5]}" for c in CASES])
def test_router_correctness(T, N, k, kind, dtype, config, device):
    seed = T * 131 + N * 7 + k
    _check_case(T, N, k, kind, dtype, config, device, seed)


@pytest.mark.parametrize("T,N,k,kind,dtype,config", GPU_CASES,
                         ids=[f"{c[0]}x{c[1]}k{c[2]}-{c[3]}-{str(c[4])[6:]}-{c[5]}" for c in GPU_CASES])
def test_router_correctness_large(T, N, k, kind, dtype, config):
    if not HAS_CUDA:
        pytest.skip("large sizes need CUDA (the interpreter runs the small cases)")
    _check_case(T, N, k, kind, dtype, config, "cuda", seed=T + N + k, big=True)


def test_router_correctness_every_config(device):
    """Every launch configuration the tuning explores gives exact results."""
    T, N, k = (4096, 256, 16) if device == "cuda" else (6, 64, 16)
    configs = [
        {}, {"kernel": "stream", "lpt": 1, "gsplit": False},
        {"kernel": "stream", "lpt": 2, "gsplit": True}, {"kernel": "stream", "lpt": 4, "gsplit": False},
        {"kernel": "stream", "warps": 1, "gsplit": True}, WARP, {"kernel": "warp", "grid": 0},
        {"kernel": "warp", "grid": 1}, {"kernel": "warp", "thresh": True, "lm": 5},
        {"kernel": "warp", "thresh": True, "tile_t": 1, "warps": 1},
    ]
    for ci, cfg in enumerate(configs):
        for kind in ("randn", "ties", "nan"):
            x, y = make_logits(T, N, BF16, device, kind, seed=ci)
            s, i = _run(x, y, k, cfg)
            check_router_output(x, y, k, s, i)


def test_config_that_does_not_apply_raises(device):
    """An explicit config is honoured or rejected, never silently changed."""
    x, y = make_logits(4, 64, BF16, device, "randn")
    warp = opt.default_config(4, 64, 16, kernel="warp")
    bad = [
        (replace(warp, thresh=True, lm=6), ValueError, "thresh"),   # 2 * M > next_pow2(N)
        (replace(warp, grid=2), ValueError, "grid"),
        (replace(warp, tile_t=3), ValueError, "tile_t"),
        (StreamConfig(lpt=8), ValueError, "lpt"),                   # > next_pow2(64) / 16
        (StreamConfig(lpt=1, gsplit=True), ValueError, "gsplit"),
        ({"kernel": "warp"}, TypeError, "StreamConfig, WarpConfig or LargeKConfig"),
    ]
    for cfg, exc, match in bad:
        with pytest.raises(exc, match=match):
            pruned_router_forward(x, y, 16, config=cfg)
    with pytest.raises(ValueError, match="StreamConfig needs"):
        pruned_router_forward(x, y, 17, config=StreamConfig())
    with pytest.raises(ValueError, match="fast path"):
        pruned_router_forward(x[:, :32], y[:, :32], 300, config=warp)
    with pytest.raises(ValueError, match="streaming kernel needs"):
        opt.default_config(4, 64, 17, kernel="stream")


def test_router_empty_and_k0(device):
    x, y = make_logits(4, 16, BF16, device, "randn")
    s, i = pruned_router_forward(x, y, 0)
    assert s.shape == (4, 0) and i.shape == (4, 0)
    x0, y0 = x[:0], y[:0]
    s, i = pruned_router_forward(x0, y0, 5)
    assert s.shape == (0, 5) and i.shape == (0, 5) and i.dtype == torch.int32
    s, i = triton_omni_router_func_optimized(x0, y0, 16, 3)
    assert s.shape == (0, 3)


def test_router_public_function_and_backward(device):
    """The autograd path: forward through the op, backward = the reference, every call."""
    for (T, N, k, dtype, kind) in ((5, 64, 16, BF16, "ties"), (4, 37, 7, F32, "masked"),
                                   (3, 8, 64, F16, "randn")):
        x, y = make_logits(T, N, dtype, device, kind, seed=k)
        x = x.clone().requires_grad_(True)
        y = y.clone().requires_grad_(True)
        s, i = triton_omni_router_func_optimized(x, y, N, k)
        check_router_output(x.detach(), y.detach(), k, s.detach(), i)
        for call in range(3):  # fresh gradients each call: no state between calls
            g = torch.randn(T, k, generator=torch.Generator().manual_seed(call)).to(dtype).to(device)
            dx, dy = torch.autograd.grad(s, (x, y), g, retain_graph=True)
            check_router_backward(g, i, N, dx, dy)


def test_router_backward_kernels(device):
    """The backward kernel in several layouts: poisoned outputs, duplicates, -0.0, k not a
    multiple of the unroll, column blocks that split a row, bitwise determinism."""
    configs = [None, {"c": 4, "tile_t": 2, "unroll": 1, "warps": 1},
               BackwardConfig(bn=16, c=8, tile_t=4, unroll=4, warps=1)]
    for (T, N, k, dtype) in ((7, 64, 16, BF16), (5, 100, 7, F32), (3, 8, 64, F16), (2, 16, 100, BF16),
                             (9, 40, 5, BF16), (3, 1, 1, F32)):
        x, y = make_logits(T, N, dtype, device, "ties", seed=N)
        _, idx = router_pruned(x, y, k)
        g = torch.randn(T, k, generator=torch.Generator().manual_seed(T)).to(dtype).to(device)
        g[:, ::3] = -0.0
        results = []
        for cfg in configs:
            if isinstance(cfg, dict):
                cfg = replace(rb.default_config(N), **cfg)
            if cfg is not None and (cfg.bn > triton_next_pow2(N) or cfg.c > cfg.bn):
                continue
            for _ in range(2):
                dx = torch.full((T, N), float("nan"), dtype=dtype, device=device)
                dy = torch.full((T, N), float("nan"), dtype=dtype, device=device)
                rb.router_backward(g, idx, N, dx, dy, config=cfg)
                check_router_backward(g, idx, N, dx, dy)
                results.append((dx, dy))
        for dx, dy in results[1:]:
            assert torch.equal(dx, results[0][0]) and torch.equal(dy, results[0][1])


def test_router_backward_strided_and_errors(device):
    """Non-contiguous grad/indices views give the reference; bad output buffers raise."""
    T, N, k = 6, 48, 9
    x, y = make_logits(T, N, BF16, device, "randn", seed=3)
    _, idx = router_pruned(x, y, k)
    g = torch.randn(k, T, generator=torch.Generator().manual_seed(5)).to(BF16).to(device).t()
    idx_t = idx.t().contiguous().t()
    assert not g.is_contiguous() and not idx_t.is_contiguous()
    dx, dy = router_backward(g, idx_t, N)
    check_router_backward(g, idx, N, dx, dy)
    with pytest.raises(ValueError, match="dx"):
        router_backward(g, idx, N, torch.empty(T, N + 1, dtype=BF16, device=device), None)
    with pytest.raises(ValueError, match="dy"):
        router_backward(g, idx, N, None, torch.empty(N, T, dtype=BF16, device=device).t())


def triton_next_pow2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


def _time_us(fn):
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3


TIMING_CASES = [(1024, 64, 16), (1024, 64, 32), (1024, 128, 16), (1024, 128, 32),
                (1024, 256, 16), (1024, 256, 32), (16384, 256, 16), (65536, 256, 16),
                (4096, 1024, 16)]


def test_router_forward_comparison(device):
    """Speedup table: optimized vs original (full scan) vs PyTorch pruned; asserts exactness."""
    if device != "cuda":
        print("\nnote: timing needs a GPU; interpreter run compares results only")
        cases = [(4, 64, 16), (3, 100, 7), (2, 256, 32)]
    else:
        cases = TIMING_CASES
    rows = []
    for (T, N, k) in cases:
        x, y = make_logits(T, N, BF16, device, "randn", seed=T + N + k)
        s, i = triton_omni_router_func_optimized(x, y, N, k)
        check_router_output(x, y, k, s, i)
        run_orig = T * N * N <= (1 << 28)
        if run_orig:
            fs, _ = triton_omni_router_func(x, y, N, k)
            assert _same(fs, s)
        if device != "cuda":
            continue
        t_opt = _time_us(lambda: triton_omni_router_func_optimized(x, y, N, k))
        t_ker = _time_us(lambda: pruned_router_forward(x, y, k))
        t_torch = _time_us(lambda: router_pruned(x, y, k))
        t_orig = _time_us(lambda: triton_omni_router_func(x, y, N, k)) if run_orig else float("nan")
        rows.append((T, N, k, t_opt, t_ker, t_orig, t_torch))
    if rows:
        print(f"\n{torch.cuda.get_device_name(0)}, bf16, do_bench median (us)")
        print(f"{'T':>6} {'N':>5} {'k':>3} | {'optimized':>9} {'(kernel)':>9} {'original':>9} "
              f"{'torch':>9} | {'vs orig':>7} {'vs torch':>8}")
        for T, N, k, a, b, c, d in rows:
            print(f"{T:>6} {N:>5} {k:>3} | {a:9.1f} {b:9.1f} {c:9.1f} {d:9.1f} | "
                  f"{c / a:7.1f} {d / a:8.1f}")


def test_router_backward_comparison(device):
    """Backward table: shared Triton backward vs PyTorch scatter-add; asserts exactness."""
    if device != "cuda":
        print("\nnote: timing needs a GPU; interpreter run compares results only")
        cases = [(4, 64, 16), (3, 100, 7)]
    else:
        cases = TIMING_CASES
    rows = []
    for (T, N, k) in cases:
        x, y = make_logits(T, N, BF16, device, "randn", seed=k)
        _, idx = pruned_router_forward(x, y, k)
        g = torch.randn(T, k, generator=torch.Generator().manual_seed(k)).to(BF16).to(device)
        dx, dy = router_backward(g, idx, N)
        if T <= 16384:
            check_router_backward(g, idx, N, dx, dy)
        if device != "cuda":
            continue
        t_tri = _time_us(lambda: router_backward(g, idx, N))
        t_ref = _time_us(lambda: router_backward_reference(g, idx, N))
        floor = (T * k * 6 + 2 * T * N * 2) / 3.0e12 * 1e6
        rows.append((T, N, k, t_tri, t_ref, floor))
    if rows:
        print(f"\n{torch.cuda.get_device_name(0)}, bf16 backward, do_bench median (us)")
        print(f"{'T':>6} {'N':>5} {'k':>3} | {'triton':>8} {'torch':>8} {'HBM floor':>9} | {'x floor':>7}")
        for T, N, k, a, b, f in rows:
            print(f"{T:>6} {N:>5} {k:>3} | {a:8.1f} {b:8.1f} {f:9.1f} | {a / f:7.1f}")


def test_config_rules():
    """The launch rules pick a valid kernel for every shape of the contract's range."""
    for N in (1, 2, 3, 8, 15, 16, 17, 64, 100, 256, 1000, 1024, 4096, 5000):
        for k in (1, 2, 5, 16, 17, 32, 64, 256, 257):
            if k > N * N:
                continue
            for T in (1, 1024, 65536):
                cfg = opt.default_config(T, N, k)
                if cfg is None:
                    assert not opt.fast_path_ok(N, k) and opt._pow2(N) > 4096
                    continue
                if isinstance(cfg, LargeKConfig):
                    # past the fast path (or from LARGE_K_MIN_K): the large-k kernel
                    assert opt.use_large_k(N, k) and (k >= opt.LARGE_K_MIN_K or not opt.fast_path_ok(N, k))
                    large_k.plan(T, N, k, True, BF16, torch.device("cpu"), cfg)
                    continue
                # the rule's choice is accepted by the launcher as given
                opt.plan(T, N, k, BF16, torch.device("cpu"), cfg)
                if isinstance(cfg, StreamConfig):
                    assert opt.stream_ok(N, k)
                    assert 1 <= cfg.lpt <= min(32, opt._pow2(N) // 16)
                else:
                    assert cfg.tile_t >= 1 and cfg.warps in (1, 2, 4, 8)
                    assert not cfg.thresh or opt.threshold_ok(N, k, cfg.lm)
            assert opt.fast_path_ok(N, k) == (k <= 256 and opt._pow2(N) <= 4096)
    assert len(opt.candidate_pairs(16, 16)) == 50
    for k in (1, 7, 16, 33, 256):
        for kx in {min(k, n) for n in (1, 3, 8, 64)}:
            pairs = opt.candidate_pairs(k, kx)
            n = max(1, kx)
            if k <= n * n:
                assert len(pairs) >= k
