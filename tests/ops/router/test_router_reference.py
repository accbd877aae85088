"""The PyTorch references (brute force, pruned, backward) against independent oracles;
CPU dispatch.

These run the PyTorch path only (no kernels), so they are fast anywhere.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omni_moe.ops.router.reference import (
    ordered_key,
    router_backward_reference,
    router_bruteforce,
    router_pruned,
)
from router_checks import DTYPES, _same, check_router_output, make_logits, oracle_topk

KINDS = ("randn", "ties", "masked", "nan", "halves", "transposed")
SHAPES = [
    (1, 1, 1), (5, 1, 0), (0, 4, 3), (8, 2, 4), (9, 3, 9), (6, 5, 25), (7, 5, 24),
    (17, 7, 3), (33, 12, 17), (10, 33, 40), (12, 33, 1), (40, 64, 16), (9, 64, 33),
    (6, 130, 31), (4, 256, 32),
]
FINITE_KINDS = ("randn", "ties", "halves", "transposed")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,N,k", SHAPES)
def test_pruned_matches_bruteforce(T, N, k, dtype, kind):
    x, y = make_logits(T, N, dtype, "cpu", kind, seed=T * 1000 + N * 10 + k)
    ref = router_bruteforce(x, y, k)
    scores, indices = router_pruned(x, y, k)
    check_router_output(x, y, k, scores, indices)
    check_router_output(x, y, k, *ref)
    if kind == "ties":
        # Integer sums are exact, so the pruned candidate grid keeps brute force's
        # lowest-flat-index choice among ties: the indices agree exactly.
        _, flat = oracle_topk(x, y, k)
        assert torch.equal(indices.long(), flat) and torch.equal(ref[1].long(), flat)


def test_bruteforce_total_order():
    # NaN ranks below -inf; equal values go to the lower flat index.
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[nan, -inf, 0.0]])
    y = torch.tensor([[0.0, 0.0, 1.0]])
    scores, indices = router_bruteforce(x, y, 9)
    # s = [nan nan nan | -inf -inf -inf | 0 0 1]
    assert indices.tolist() == [[8, 6, 7, 3, 4, 5, 0, 1, 2]]
    assert _same(scores, torch.tensor([[1.0, 0, 0, -inf, -inf, -inf, nan, nan, nan]]))
    keys = ordered_key(torch.tensor([nan, -nan, -inf, -1.0, -0.0, 0.0, 1.0, inf]))
    assert keys[0] == keys[1]
    assert bool((keys[1:-1] < keys[2:]).all())


# Logit values that stress the order: -inf masks, NaN, +inf, signed zeros, ties.
_VALUES = st.one_of(
    st.sampled_from([float("-inf"), float("nan"), float("inf"), 0.0, -0.0, 1.0, -1.0, 2.0]),
    st.integers(-3, 3).map(float),
    st.floats(-1e4, 1e4, allow_nan=False, width=32),
)


@st.composite
def _router_case(draw):
    T = draw(st.integers(0, 5))
    N = draw(st.integers(1, 7))
    k = draw(st.integers(0, N * N))
    dtype = draw(st.sampled_from(DTYPES))
    vals = draw(st.lists(_VALUES, min_size=2 * T * N, max_size=2 * T * N))
    z = torch.tensor(vals, dtype=torch.float32).reshape(2, T, N).to(dtype)
    return z[0], z[1], k


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_router_case())
def test_pruned_matches_bruteforce_property(case):
    x, y, k = case
    ref = router_bruteforce(x, y, k)
    check_router_output(x, y, k, *router_pruned(x, y, k))
    check_router_output(x, y, k, *ref)


def _dense_backward_f64(grad, indices, n):
    """dx = g @ onehot(idx div n), dy = g @ onehot(idx mod n), in float64."""
    idx = indices.long()
    g = grad.double()
    ox = torch.nn.functional.one_hot(idx // n, n).double()  # (T, k, n)
    oy = torch.nn.functional.one_hot(idx % n, n).double()
    return torch.einsum("tk,tkn->tn", g, ox), torch.einsum("tk,tkn->tn", g, oy)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,N,k", [(0, 4, 3), (1, 1, 1), (9, 3, 9), (33, 12, 17), (16, 64, 32), (5, 130, 7)])
def test_backward_reference_matches_dense_formula(T, N, k, dtype):
    gen = torch.Generator().manual_seed(T + N + k)
    x, y = make_logits(T, N, dtype, "cpu", "ties", seed=N)
    _, indices = router_bruteforce(x, y, k)
    # Small integers: every partial sum is exact, so float32 accumulation must agree
    # bitwise with the float64 formula.
    g_int = torch.randint(-8, 9, (T, k), generator=gen).to(dtype)
    dx, dy = router_backward_reference(g_int, indices, N)
    fx, fy = _dense_backward_f64(g_int, indices, N)
    assert dx.dtype == dtype and dy.dtype == dtype and dx.shape == (T, N)
    assert torch.equal(dx, fx.to(dtype)) and torch.equal(dy, fy.to(dtype))
    # Random gradients: float32 accumulation of <= k terms (error <= k * 2^-24 * sum|g|),
    # then one rounding to dtype (<= half an ulp of the result, 2^-p relative).
    g = torch.randn(T, k, generator=gen).to(dtype)
    rel = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    got = router_backward_reference(g, indices, N)
    want = _dense_backward_f64(g, indices, N)
    abs_sum = _dense_backward_f64(g.abs(), indices, N)
    for a, w, m in zip(got, want, abs_sum):
        tol = k * 2.0**-24 * m * (1 + rel) + rel * w.abs()
        assert bool(((a.double() - w).abs() <= tol).all())


def test_cpu_dispatch_without_interpreter():
    """Without TRITON_INTERPRET, CPU tensors take the PyTorch path (no kernel runs)."""
    code = textwrap.dedent(
        """
        import torch
        import omni_moe
        from omni_moe.ops.router import op
        from omni_moe.ops._dispatch import use_triton, interpret_mode
        from omni_moe.ops.router.reference import router_bruteforce, router_pruned

        def no_kernel(*args, **kwargs):
            raise AssertionError("a Triton kernel was launched for CPU tensors")
        for name in op._TRITON_FORWARD:
            op._TRITON_FORWARD[name] = no_kernel
        op.router_backward = no_kernel
        fullscan = lambda x, y, n, k: op.route(x, y, n, k, "fullscan")

        x = torch.randn(8, 6, requires_grad=True)
        y = torch.randn(8, 6, requires_grad=True)
        assert not interpret_mode() and not use_triton(x)
        for fn in (omni_moe.omni_router, fullscan):
            s, i = fn(x, y, 6, 5)
            rs, ri = router_pruned(x.detach(), y.detach(), 5)
            bs, _ = router_bruteforce(x.detach(), y.detach(), 5)
            assert torch.equal(s, rs) and torch.equal(i, ri) and torch.equal(s, bs)
            g = torch.randn(8, 5)
            dx, dy = torch.autograd.grad(s, (x, y), g)
            assert torch.equal(dx, torch.zeros(8, 6).scatter_add_(1, i.long() // 6, g))
            assert torch.equal(dy, torch.zeros(8, 6).scatter_add_(1, i.long() % 6, g))
        print("DISPATCH-OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DISPATCH-OK" in res.stdout
