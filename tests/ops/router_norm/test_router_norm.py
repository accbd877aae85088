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
    with pytest.raises(ValueError, match=r"^config\.row_block must be a power of two >= 1, got 3$"):
        rn.norm_log_softmax_forward(x, 3, "none", config=rn.RouterNormConfig(splits=2, row_block=3))


# ---------------------------------------------------------------- column programs, guards
# The finalize kernels cover the 2N columns with programs of BLOCK_C columns.  With 2N
# at most one block (every case above), a store without its column mask writes past the
# buffer and only the interpreter's abort shows it.  Here 2N spans several blocks, the
# last one partial, and every output lives inside a NaN-poisoned guard region: a store
# outside its columns either overwrites a neighbour's value (the comparison fails) or
# lands in the guard (the guard check fails).

GUARD = 128   # elements on each side: more than an unmasked tile can reach past either end


def guarded(shape, device):
    """(buffer, view): a contiguous ``view`` of ``shape`` inside ``buffer``, between two
    NaN guards of GUARD elements (the y-axis running statistics are addressed at column
    - N, so a stray store can land before the view as well as after it)."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((n + 2 * GUARD,), float("nan"), dtype=torch.float32, device=device)
    return buf, buf[GUARD:GUARD + n].view(shape)


def assert_guard(buf, name):
    guard = torch.cat((buf[:GUARD], buf[-GUARD:])).cpu()
    assert torch.isnan(guard).all(), f"{name}: {int((~torch.isnan(guard)).sum())} guard elements written"


FINALIZE_CASES = [
    # (T, N, stats_tile, final_tile): 2N columns in several finalize programs
    (23, 13, (8, 16), (4, 16)),      # 26 columns: programs of 16, the second partial
    (41, 37, (16, 32), (8, 32)),     # 74 columns: 3 programs, the last one of 10
    (19, 45, (64, 32), (32, 64)),    # the default tiles, 90 columns: 2 programs
]


@pytest.mark.parametrize("T,N,stats_tile,final_tile", FINALIZE_CASES,
                         ids=[f"T{c[0]}_N{c[1]}_fc{c[3][1]}" for c in FINALIZE_CASES])
def test_finalize_stays_inside_its_columns(device, T, N, stats_tile, final_tile):
    """The statistics and sums finalize kernels, launched on their own, write exactly the
    2N columns of their outputs and of the running statistics (float64 oracle)."""
    g = torch.Generator().manual_seed(7 * T + N)
    C = 2 * N
    x = (torch.randn(T, C, generator=g) * 2.0 + 0.5).to(device)
    cfg = rn.RouterNormConfig(splits=3, stats_tile=stats_tile, final_tile=final_tile)
    S, rows = rn.split_rows(T, cfg.splits)
    part_buf, part = guarded((S, 2, C), device)
    rn.stats_partials(x, part, rows, cfg)
    assert_guard(part_buf, "partial statistics")

    rm0 = [torch.randn(N, generator=g) * 0.1 for _ in range(2)]
    rv0 = [torch.rand(N, generator=g) + 0.5 for _ in range(2)]
    bufs, running = [], []
    for ax in range(2):
        for init in (rm0[ax], rv0[ax]):
            buf, view = guarded((N,), device)
            view.copy_(init)
            bufs.append(buf)
            running.append(view)
    nbt = [torch.tensor(3, device=device) for _ in range(2)]
    running = (running[0], running[1], nbt[0], running[2], running[3], nbt[1])
    stats_buf, stats = guarded((2, C), device)
    mom, eps = 0.1, 1e-5
    rn.stats_finalize(part, stats, running, T, N, rows, mom, eps, cfg)

    xd = x.double().cpu()
    mean, var = xd.mean(0), xd.var(0, unbiased=False)
    assert rel(stats[0], mean) <= 1e-6
    assert rel(stats[1], 1.0 / torch.sqrt(var + eps)) <= 1e-6
    for ax in range(2):
        cols = slice(ax * N, (ax + 1) * N)
        assert rel(running[3 * ax], (1 - mom) * rm0[ax].double() + mom * mean[cols]) <= 1e-6
        assert rel(running[3 * ax + 1], (1 - mom) * rv0[ax].double()
                   + mom * xd[:, cols].var(0, unbiased=True)) <= 1e-6
    assert int(nbt[0]) == 4 and int(nbt[1]) == 4
    assert_guard(stats_buf, "stats")
    for buf, name in zip(bufs, ("running_mean x", "running_var x", "running_mean y", "running_var y")):
        assert_guard(buf, name)

    B = 5
    sums_part = torch.randn(B, 2, C, generator=g).to(device)
    sums_buf, sums = guarded((2, C), device)
    rn.sums_finalize(sums_part, sums, cfg)
    assert rel(sums, sums_part.double().cpu().sum(0)) <= 1e-6
    assert_guard(sums_buf, "column sums")


@pytest.mark.parametrize("mode", ["batch", "running", "none"])
@pytest.mark.parametrize("T,N,stats_tile,final_tile", FINALIZE_CASES,
                         ids=[f"T{c[0]}_N{c[1]}_fc{c[3][1]}" for c in FINALIZE_CASES])
def test_several_column_programs(device, mode, T, N, stats_tile, final_tile):
    """Forward and backward through the launchers when 2N spans several column programs
    of every kernel; outputs written into strided, NaN-poisoned buffers whose extra
    columns must stay NaN."""
    g = torch.Generator().manual_seed(11 * T + N)
    C = 2 * N
    x = (torch.randn(T, C, generator=g) * 3.0 + 1.0).to(device)
    dpx = torch.randn(T, N, generator=g).to(device)
    dpy = torch.randn(T, N, generator=g).to(device)
    rm = [torch.randn(N, generator=g) * 0.1 for _ in range(2)]
    rv = [torch.rand(N, generator=g) + 0.5 for _ in range(2)]
    running = (rm[0].clone().to(device), rv[0].clone().to(device), torch.tensor(0, device=device),
               rm[1].clone().to(device), rv[1].clone().to(device), torch.tensor(0, device=device))
    eps = 1e-5
    cfg = rn.RouterNormConfig(splits=3, stats_tile=stats_tile, final_tile=final_tile)
    out_big = torch.full((T, C + 7), float("nan"), device=device)
    dx_big = torch.full((T, C + 7), float("nan"), device=device)
    run = running if mode != "none" else None
    p, stats = rn.norm_log_softmax_forward(x, N, mode, run, 0.1, eps, out=out_big[:, :C], config=cfg)
    dx = rn.norm_log_softmax_backward(dpx, dpy, p, x, stats, N, mode, run, eps, dx=dx_big[:, :C],
                                      config=cfg)

    xa = x.double().cpu().requires_grad_()
    if mode == "batch":
        xh = (xa - xa.mean(0)) / torch.sqrt(xa.var(0, unbiased=False) + eps)
    elif mode == "running":
        rmd, rvd = torch.cat(rm).double(), torch.cat(rv).double()
        xh = (xa - rmd) / torch.sqrt(rvd + eps)
    else:
        xh = xa
    ref = torch.cat((F.log_softmax(xh[:, :N], -1), F.log_softmax(xh[:, N:], -1)), 1)
    ref.backward(torch.cat((dpx, dpy), 1).double().cpu())
    assert rel(p, ref.detach()) <= 1e-6
    assert rel(dx, xa.grad) <= 1e-5
    assert torch.isnan(out_big[:, C:]).all() and torch.isnan(dx_big[:, C:]).all()


# ---------------------------------------------------------------- saved running statistics
@pytest.mark.parametrize("N", [5, 40])
def test_running_mode_backward_after_a_training_call(device, N):
    """An eval-mode ("running") forward with grad, then a training-mode forward (which
    updates the running statistics in place, inside a kernel), then the first call's
    backward: its input gradient must be the one of the statistics it was computed with
    -- bitwise what an immediate backward gives, and the float64 value."""
    from omni_moe.ops.router_norm.op import router_log_probs

    g = torch.Generator().manual_seed(N)
    T, eps, mom = 16, 1e-5, 0.5
    running = (torch.zeros(N, device=device), torch.full((N,), 0.25, device=device),
               torch.tensor(0, device=device),
               torch.full((N,), 0.3, device=device), torch.full((N,), 4.0, device=device),
               torch.tensor(0, device=device))
    snapshot = tuple(t.clone() for t in running)
    x = (torch.randn(T, 2 * N, generator=g) * 3.0).to(device)
    dpx = torch.randn(T, N, generator=g).to(device)
    dpy = torch.randn(T, N, generator=g).to(device)

    def grad_of(stats, backward_later):
        xe = x.clone().requires_grad_()
        px, py = router_log_probs(xe, N, "running", stats, mom, eps)
        if backward_later:
            # A training call between the forward and its backward (batch variance ~9:
            # with momentum 0.5 it moves every running variance far from 0.25 and 4).
            xt = (torch.randn(T, 2 * N, generator=g) * 3.0).to(device)
            router_log_probs(xt, N, "batch", stats, mom, eps)
            assert not torch.equal(stats[1], snapshot[1]) and not torch.equal(stats[4], snapshot[4])
        torch.autograd.backward((px, py), (dpx, dpy))
        return xe.grad

    later = grad_of(running, True)
    now = grad_of(tuple(t.clone() for t in snapshot), False)
    assert torch.equal(later, now)
    xa = x.double().cpu().requires_grad_()
    rmd = torch.cat((snapshot[0], snapshot[3])).double().cpu()
    rvd = torch.cat((snapshot[1], snapshot[4])).double().cpu()
    xh = (xa - rmd) / torch.sqrt(rvd + eps)
    torch.autograd.backward((F.log_softmax(xh[:, :N], -1), F.log_softmax(xh[:, N:], -1)),
                            (dpx.double().cpu(), dpy.double().cpu()))
    assert rel(later, xa.grad) <= 1e-5
