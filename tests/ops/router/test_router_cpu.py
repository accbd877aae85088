"""The CPU router: the full-product algorithm is bitwise brute force's output (ties and
NaN included); whichever algorithm the size rule picks meets the contract.  PyTorch
only."""

import pytest
import torch

from omni_moe import omni_router
from omni_moe.ops.router.reference import router_bruteforce
from omni_moe.ops.router.cpu import router_cpu, router_full_product, use_full_product
from router_checks import DTYPES, check_router_output, make_logits

KINDS = ("randn", "ties", "masked", "nan", "halves", "transposed")
SHAPES = [(1, 1, 1), (5, 1, 0), (0, 4, 3), (8, 2, 4), (9, 3, 9), (6, 5, 25), (7, 5, 24),
          (17, 7, 3), (33, 12, 17), (10, 33, 40), (40, 64, 16), (9, 64, 33)]


def _bitwise(a, b):
    (s, i), (rs, ri) = a, b
    assert s.dtype == rs.dtype and i.dtype == ri.dtype == torch.int32
    assert torch.equal(i, ri)
    # Bit for bit (so -0.0 and +0.0 too), except a NaN's payload, which means nothing.
    nan = torch.isnan(s)
    assert torch.equal(nan, torch.isnan(rs))
    bits = torch.int16 if s.element_size() == 2 else torch.int32
    assert torch.equal(s.view(bits)[~nan], rs.view(bits)[~nan])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,N,k", SHAPES)
def test_full_product_is_bruteforce(T, N, k, dtype, kind):
    x, y = make_logits(T, N, dtype, "cpu", kind, seed=T * 1000 + N * 10 + k)
    ref = router_bruteforce(x, y, k)
    out = router_full_product(x, y, k)
    check_router_output(x, y, k, *out)
    _bitwise(out, ref)
    check_router_output(x, y, k, *router_cpu(x, y, k))


def test_full_product_order_edge_cases():
    nan, inf = float("nan"), float("inf")
    # NaN below -inf; -0.0 after +0.0 (key order, as brute force); equal sums by index.
    x = torch.tensor([[nan, -inf, 0.0, -0.0], [1.0, 1.0, 1.0, 1.0], [nan, nan, nan, nan]])
    y = torch.tensor([[0.0, -0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    for k in (1, 3, 5, 9, 13, 16):
        _bitwise(router_full_product(x, y, k), router_bruteforce(x, y, k))


def test_cpu_dispatch_uses_rule(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    import omni_moe.ops.router.cpu as rc

    calls = []
    monkeypatch.setattr(rc, "router_full_product", lambda x, y, k: calls.append("full") or router_full_product(x, y, k))
    for T, N, k, dtype in ((64, 8, 4, torch.float32), (64, 64, 16, torch.float32),
                           (1024, 16, 7, torch.float32), (64, 8, 4, torch.bfloat16)):
        x, y = make_logits(T, N, dtype, "cpu", "randn", seed=N)
        calls.clear()
        check_router_output(x, y, k, *omni_router(x, y, N, k))
        assert calls == (["full"] if use_full_product(T, N, k, dtype) else [])
    assert use_full_product(64, 8, 4) and not use_full_product(64, 8, 4, torch.bfloat16)
