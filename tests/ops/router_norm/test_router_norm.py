"""The router prologue (BatchNorm / none + log_softmax of both axes): kernels against a
float64 PyTorch oracle, the reference against torch's own BatchNorm1d."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from omni_moe.ops.router_norm import kernels as rn
from omni_moe.ops.router_norm.reference import router_log_probs_reference


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


@pytest.mark.parametrize("mode", ["batch", "running", "none"])
@pytest.mark.parametrize("T,N,splits,dtype", [
    (37, 5, 3, torch.float32),       # three uneven row splits, N not a power of two
    (130, 16, 2, torch.float32),     # splits of 65 rows: a full and a 1-row tile each
    (9, 3, None, torch.bfloat16),    # bf16 logits (the GEMM's dtype), default splits
    (520, 4, None, torch.float32),   # 260 splits and 33 row blocks: several finalize tiles
], ids=["T37_N5", "T130_N16", "T9_N3_bf16", "T520_N4"])
def test_router_norm_kernels(device, mode, T, N, splits, dtype):
    """BatchNorm (batch / running statistics / none) + log_softmax of both router axes
    and the backward, against float64 PyTorch; running statistics updated once; strided
    inputs, poisoned outputs."""
    g = torch.Generator().manual_seed(T + N)
    big = torch.randn(T, 2 * N + 3, generator=g) * 3.0 + 1.5
    x = big.to(dtype).to(device)[:, 1:2 * N + 1]                      # row stride 2N + 3
    dpx = torch.randn(N, T, generator=g).to(device).t()                # column-major
    dpy = torch.randn(T, N, generator=g).to(device)
    rm = [(torch.randn(N, generator=g) * 0.1).to(device) for _ in range(2)]
    rv = [(torch.rand(N, generator=g) + 0.5).to(device) for _ in range(2)]
    nbt = [torch.tensor(3, device=device) for _ in range(2)]
    running = (rm[0].clone(), rv[0].clone(), nbt[0], rm[1].clone(), rv[1].clone(), nbt[1])
    mom, eps = 0.1, 1e-5

    ref_p, ref_dx, ref_rm, ref_rv = [], [], [], []
    for ax, dp in enumerate((dpx, dpy)):
        xa = x[:, ax * N:(ax + 1) * N].detach().double().cpu().requires_grad_()
        if mode == "batch":
            mean, var = xa.mean(0), xa.var(0, unbiased=False)
            xh = (xa - mean) / torch.sqrt(var + eps)
            ref_rm.append((1 - mom) * rm[ax].double().cpu() + mom * mean.detach())
            ref_rv.append((1 - mom) * rv[ax].double().cpu() + mom * xa.detach().var(0, unbiased=True))
        elif mode == "running":
            xh = (xa - rm[ax].double().cpu()) / torch.sqrt(rv[ax].double().cpu() + eps)
        else:
            xh = xa
        p = F.log_softmax(xh, dim=-1)
        p.backward(dp.double().cpu())
        ref_p.append(p.detach())
        ref_dx.append(xa.grad)

    cfg = None if splits is None else replace(rn.default_config(T, N), splits=splits)
    out = torch.full((T, 2 * N), float("nan"), device=device)
    p, stats = rn.norm_log_softmax_forward(x, N, mode, running if mode != "none" else None,
                                           mom, eps, out=out, config=cfg)
    dx = torch.full((T, 2 * N), float("nan"), dtype=dtype, device=device)
    got = rn.norm_log_softmax_backward(dpx, dpy, p, x, stats, N, mode,
                                       running if mode != "none" else None, eps, dx=dx, config=cfg)
    assert p is out and got is dx and dx.dtype == dtype
    tol_dx = 1e-5 if dtype == torch.float32 else 2.0**-8
    for ax in range(2):
        cols = slice(ax * N, (ax + 1) * N)
        assert rel(p[:, cols], ref_p[ax]) <= 1e-6
        assert rel(dx[:, cols], ref_dx[ax]) <= tol_dx
    if mode == "batch":
        for ax in range(2):
            assert rel(running[3 * ax], ref_rm[ax]) <= 1e-6
            assert rel(running[3 * ax + 1], ref_rv[ax]) <= 1e-6
        assert int(nbt[0]) == 4 and int(nbt[1]) == 4
    elif mode == "running":
        assert torch.equal(running[0], rm[0]) and torch.equal(running[4], rv[1])
        assert int(nbt[0]) == 3


@pytest.mark.parametrize("mode", ["batch", "running", "none"])
def test_reference_matches_torch_batchnorm(mode):
    """The reference against nn.BatchNorm1d(affine=False) + log_softmax (float64)."""
    T, N = 11, 6
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, 2 * N, generator=g, dtype=torch.float64) * 2 + 0.5
    bns = [nn.BatchNorm1d(N, affine=False, momentum=0.1, eps=1e-5).double() for _ in range(2)]
    for bn in bns:
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.5, 1.5, generator=g)
        bn.train(mode == "batch")
    running = tuple(t.clone() for bn in bns for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked))
    px, py = router_log_probs_reference(x, N, mode, running, 0.1, 1e-5)
    for ax, got in enumerate((px, py)):
        xa = x[:, ax * N:(ax + 1) * N]
        want = F.log_softmax(xa if mode == "none" else bns[ax](xa), dim=-1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        if mode == "batch":
            torch.testing.assert_close(running[3 * ax], bns[ax].running_mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(running[3 * ax + 1], bns[ax].running_var, rtol=1e-12, atol=1e-12)
            assert int(running[3 * ax + 2]) == int(bns[ax].num_batches_tracked)


def test_config_checked():
    x = torch.zeros(4, 6)
    with pytest.raises(TypeError, match="RouterNormConfig"):
        rn.norm_log_softmax_forward(x, 3, "none", config={"splits": 2})
    with pytest.raises(ValueError, match="powers of two"):
        rn.norm_log_softmax_forward(x, 3, "none", config=rn.RouterNormConfig(splits=2, row_block=3))
