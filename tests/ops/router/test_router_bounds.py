"""Router kernels on inputs built to sit on the pruning bounds, against the oracle.

The pruned kernels consider only rank pairs (a, b) with (a + 1)(b + 1) <= k.  With
x[a] = -log(a + 1) and y[b] = -log(b + 1) (columns shuffled) the top-k are exactly the
pairs of smallest (a + 1)(b + 1): every pair on the bound is needed, so a kernel that
drops one (an off-by-one in a block or pair bound) returns a wrong score.  Rows with one
dominant logit need the whole first row or column of the rank grid.  The streaming
kernel runs every k in 1..16 this way, with and without the shared grid stage.
The backward runs into poisoned buffers wider than the rows, so a store outside the
(T, N) block changes a sentinel and fails an assertion.
"""

from __future__ import annotations

import math

import pytest
import torch

from omni_moe.ops.router.pruned import pruned_router_forward
from omni_moe.ops.router.backward import BackwardConfig, FixedBackwardConfig, SortBackwardConfig, router_backward
from omni_moe.ops.router.large_k import large_k_router_forward
from router_checks import check_router_backward, check_router_output, pruned_config

F32, BF16 = torch.float32, torch.bfloat16


def bound_logits(N, dtype, device, seed):
    """(4, N) x, y: hyperbola rows (two shufflings), an x-dominant and a y-dominant row."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.tensor([-math.log(a + 1) for a in range(N)])
    rows_x, rows_y = [], []
    for _ in range(2):
        rows_x.append(ranks[torch.randperm(N, generator=g)])
        rows_y.append(ranks[torch.randperm(N, generator=g)])
    spread = torch.randn(N, generator=g)
    dom = torch.full((N,), -8.0)
    dom[int(torch.randint(0, N, (1,), generator=g))] = 8.0
    rows_x += [dom, spread]
    rows_y += [spread, dom]
    x = torch.stack(rows_x).to(dtype).to(device)
    y = torch.stack(rows_y).to(dtype).to(device)
    return x, y


STREAM_CFGS = [
    pytest.param({"kernel": "stream", "lpt": 1, "gsplit": False}, id="lpt1"),
    pytest.param({"kernel": "stream", "lpt": 2, "gsplit": True}, id="lpt2-gsplit"),
]


@pytest.mark.parametrize("cfg", STREAM_CFGS)
def test_stream_every_k_on_the_bound(cfg, device):
    N = 32
    for k in range(1, 17):
        dtype = (F32, BF16)[k % 2]
        x, y = bound_logits(N, dtype, device, seed=k)
        s = torch.full((4, k), float("nan"), dtype=dtype, device=device)
        i = torch.full((4, k), -1, dtype=torch.int32, device=device)
        pruned_router_forward(x, y, k, s, i, config=pruned_config(4, N, k, cfg))
        try:
            check_router_output(x, y, k, s, i)
        except AssertionError as e:
            raise AssertionError(f"k={k}: {e}") from None


@pytest.mark.parametrize("cfg", [
    pytest.param({"kernel": "warp"}, id="warp"),
    pytest.param({"kernel": "warp", "grid": 0}, id="warp-grid0"),
])
@pytest.mark.parametrize("k", [4, 6, 9])
def test_warp_on_the_bound(cfg, k, device):
    x, y = bound_logits(32, BF16, device, seed=100 + k)
    s, i = pruned_router_forward(x, y, k, config=pruned_config(4, 32, k, cfg))
    check_router_output(x, y, k, s, i)


def test_large_k_on_the_bound(device):
    """The large-k kernel on hyperbola rows (every pair of the staircase needed, many
    near-equal sums) past k = N, and a second call: bitwise the same."""
    N = 24
    x, y = bound_logits(N, F32, device, seed=5)
    for k in (N, 3 * N + 1, N * N // 2):
        a = large_k_router_forward(x, y, k)
        b = large_k_router_forward(x, y, k)
        assert torch.equal(a[1], b[1]) and bool(((a[0] == b[0]) | a[0].isnan()).all())
        check_router_output(x, y, k, *a)


SENTINEL = -12345.0


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
@pytest.mark.parametrize("N,cfg", [
    (12, None),
    (20, BackwardConfig(bn=16, c=8, tile_t=4, unroll=4, warps=1)),
    (20, SortBackwardConfig(block=4, tile_t=2)),
    (20, FixedBackwardConfig(block=4, tile_t=2)),
], ids=["default", "bn16", "sort", "fixed"])
def test_backward_stays_inside_its_rows(N, cfg, dtype, device):
    """Outputs are views of a poisoned (T + 3, N + 24) buffer: every element outside the
    (T, N) block must keep its sentinel, every element inside must match the oracle."""
    T, k = 5, 7
    g = torch.Generator().manual_seed(N)
    idx = torch.stack([torch.randperm(N * N, generator=g)[:k] for _ in range(T)]).int().to(device)
    grad = torch.randn(T, k, generator=g).to(dtype).to(device)
    bufs = [torch.full((T + 3, N + 24), SENTINEL, dtype=dtype, device=device) for _ in range(2)]
    dx, dy = (b[:T, :N] for b in bufs)
    router_backward(grad, idx, N, dx, dy, config=cfg)
    for name, b in zip(("dx", "dy"), bufs):
        outside = b.clone()
        outside[:T, :N] = SENTINEL
        assert bool((outside == SENTINEL).all()), f"{name}: a store left the (T, N) block"
    check_router_backward(grad, idx, N, dx, dy)
