"""Fused gated activation (omni_moe.swiglu) and the dense MLP helper.

Kernels run on CUDA when present, else on CPU through Triton's interpreter
(TRITON_INTERPRET=1); the PyTorch path (CPU without the interpreter) is tested too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA
from omni_moe.ops.swiglu.cpu import swiglu_forward_torch
from omni_moe.ops.swiglu.op import swiglu, swiglu_mlp
from omni_moe.ops.swiglu.reference import swiglu_naive
from omni_moe.ops.swiglu.kernels import SwigluConfig, default_config, swiglu_backward, swiglu_forward

# sigmoid(x) = 1 / (1 + exp(-x)) overflows exp harmlessly for x << 0 under the interpreter.
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
              pytest.mark.usefixtures("no_tf32")]

ACTS = ("silu", "gelu", "relu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Unit roundoff of each dtype: a once-rounded float32 result is within this (relative).
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def rel(a, b):
    a, b = a.double(), b.double()
    d = (a - b).norm()
    n = b.norm()
    return float(d / n) if n > 0 else float(d)


def act64(g, act):
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[act](g)


def exact(gate, up, act, grad):
    """float64 forward and gradients through autograd of the plain formula."""
    g = gate.detach().double().requires_grad_()
    u = up.detach().double().requires_grad_()
    out = swiglu_naive(g, u, act)
    out.backward(grad.double())
    return out.detach(), g.grad, u.grad


def make_pair(shape, dtype, device, layout, seed):
    """gate, up of ``shape`` in one of several memory layouts."""
    gen = torch.Generator().manual_seed(seed)
    *lead, n = shape
    if layout == "contiguous":
        g = torch.randn(shape, generator=gen) * 3
        u = torch.randn(shape, generator=gen)
    elif layout == "halves":  # the two column halves of one fused projection
        z = torch.randn(*lead, 2 * n, generator=gen)
        z[..., :n] *= 3
        return z[..., :n].to(dtype).to(device), z[..., n:].to(dtype).to(device)
    elif layout == "transposed":  # column-major 2-D views
        (m,) = lead
        g = (torch.randn(n, m, generator=gen) * 3).to(dtype).to(device)
        u = torch.randn(n, m, generator=gen).to(dtype).to(device)
        return g.t(), u.t()
    else:
        raise ValueError(layout)
    return g.to(dtype).to(device), u.to(dtype).to(device)


def check_once(out, ref, dtype, what, scale):
    """Each element is one rounding of a float32 value near the exact one.

    ``scale`` bounds the float32 error that cannot be relative: act(g) = g * cdf(g) loses
    cdf's relative precision where cdf is tiny (GELU's 1 + erf(x) for x << 0, as in
    torch's own float32 GELU), so an absolute 2^-23 * |g * u| is allowed besides.
    """
    tol = 2 * EPS[dtype] + 1e-6
    err = (out.double() - ref).abs()
    allow = tol * ref.abs() + 2.0**-23 * scale
    # Subnormal results of fp16/bf16 are rounded on an absolute grid.
    allow = allow + torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    bad = err > allow
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} elements off, e.g. {out[bad][:4]} vs {ref[bad][:4]}"


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", [
    ((37, 100), "contiguous"),
    ((37, 100), "halves"),
    ((100, 37), "transposed"),
    ((3, 5, 130), "contiguous"),
    ((1, 1), "contiguous"),
])
def test_kernels_once_rounded(device, act, dtype, shape, layout):
    gate, up = make_pair(shape, dtype, device, layout, seed=10 * ACTS.index(act) + DTYPES.index(dtype))
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(device)
    g2 = gate.reshape(-1, shape[-1]) if gate.dim() != 2 else gate
    u2 = up.reshape(-1, shape[-1]) if up.dim() != 2 else up
    d2 = grad.reshape(-1, shape[-1])
    M, I = g2.shape
    # Poisoned outputs: every element must be written.
    out = swiglu_forward(g2, u2, act, out=torch.full((M, I), float("nan"), dtype=dtype, device=device))
    dg, du = swiglu_backward(
        d2, g2, u2, act,
        dgate=torch.full((M, I), float("nan"), dtype=dtype, device=device),
        dup=torch.full((M, I), float("nan"), dtype=dtype, device=device),
    )
    r_out, r_dg, r_du = exact(g2.cpu(), u2.cpu(), act, d2.cpu())
    scale = (g2.cpu().double() * u2.cpu().double()).abs()
    check_once(out.cpu(), r_out, dtype, "out", scale)
    check_once(du.cpu(), r_du, dtype, "dup", scale / u2.cpu().double().abs() * d2.cpu().double().abs())
    # dgate = d*u*act'(g) has three float32 roundings and act' is a difference for silu.
    assert rel(dg.cpu(), r_dg) <= 4 * EPS[dtype] + 1e-6
    # The PyTorch path computes the same float32 formula.
    t_out = swiglu_forward_torch(g2.cpu(), u2.cpu(), act)
    assert rel(out.cpu(), t_out) <= 2 * EPS[dtype]


@pytest.mark.parametrize("config", [SwigluConfig(block_m=2, block_i=16, warps=1),
                                    SwigluConfig(block_m=4, block_i=32, warps=2)], ids=str)
def test_kernels_small_tiles(device, config):
    """Tiles that split rows and columns with ragged edges: every element written once,
    equal to the default launch bit for bit (the math is per element)."""
    M, I = 7, 37
    gate, up = make_pair((M, I), torch.bfloat16, device, "halves", seed=3)
    grad = torch.randn(M, I, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(device)
    nan = lambda: torch.full((M, I), float("nan"), dtype=torch.bfloat16, device=device)
    out = swiglu_forward(gate, up, "gelu", out=nan(), config=config)
    dg, du = swiglu_backward(grad, gate, up, "gelu", dgate=nan(), dup=nan(), config=config)
    assert torch.equal(out, swiglu_forward(gate, up, "gelu"))
    ref_dg, ref_du = swiglu_backward(grad, gate, up, "gelu")
    assert torch.equal(dg, ref_dg) and torch.equal(du, ref_du)
    assert default_config(M, I) != config


def test_config_checked():
    g = torch.zeros(2, 4)
    with pytest.raises(TypeError, match="SwigluConfig"):
        swiglu_forward(g, g, "silu", config={"block_m": 2})
    with pytest.raises(ValueError, match="block_i"):
        swiglu_forward(g, g, "silu", config=SwigluConfig(block_m=2, block_i=3, warps=1))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_op_autograd_and_strides(device, act, dtype):
    """The public op: forward + autograd on (B, S, I) and on strided halves."""
    for shape, layout in (((2, 9, 48), "contiguous"), ((17, 40), "halves"), ((40, 17), "transposed")):
        gate, up = make_pair(shape, dtype, device, layout, seed=3)
        gate.requires_grad_()
        up.requires_grad_()
        out = swiglu(gate, up, act)
        assert out.shape == gate.shape and out.dtype == dtype and out.is_contiguous()
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
        out.backward(grad)
        r_out, r_dg, r_du = exact(gate.detach().cpu(), up.detach().cpu(), act, grad.cpu())
        tol = 4 * EPS[dtype] + 1e-6
        assert rel(out.detach().cpu(), r_out) <= tol
        assert rel(gate.grad.cpu(), r_dg) <= tol
        assert rel(up.grad.cpu(), r_du) <= tol


def test_no_saved_state_between_calls(device):
    """Three calls in a row with fresh inputs: each result right (no stale buffers)."""
    for seed in range(3):
        gate, up = make_pair((33, 70), torch.float32, device, "contiguous", seed)
        gate.requires_grad_()
        up.requires_grad_()
        out = swiglu(gate, up)
        out.sum().backward()
        r_out, r_dg, r_du = exact(gate.detach().cpu(), up.detach().cpu(), "silu", torch.ones(33, 70))
        assert rel(out.detach().cpu(), r_out) < 1e-6
        assert rel(gate.grad.cpu(), r_dg) < 1e-6
        assert rel(up.grad.cpu(), r_du) < 1e-6


def test_special_values(device):
    g = torch.tensor([[0.0, -0.0, float("nan"), 1e30, -1e30, 88.0, -88.0, 1e-40]], device=device)
    u = torch.ones_like(g)
    for act in ACTS:
        out = swiglu(g, u, act).cpu()
        ref = act64(g.cpu().double(), act)
        both_nan = torch.isnan(out) & torch.isnan(ref)
        assert bool(both_nan[0, 2]), f"{act}: NaN must propagate"
        ok = both_nan | torch.isclose(out.double(), ref, rtol=1e-6, atol=1e-30)
        assert bool(ok.all()), (act, out, ref)


def test_empty(device):
    for shape in ((0, 16), (16, 0), (2, 0, 8)):
        g = torch.randn(shape, device=device, requires_grad=True)
        u = torch.randn(shape, device=device, requires_grad=True)
        out = swiglu(g, u)
        assert out.shape == shape
        out.sum().backward()
        assert g.grad.shape == shape and u.grad.shape == shape


def test_torch_path_matches_formula(monkeypatch):
    """CPU tensors without the interpreter take the PyTorch path: same float32 formula."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for act in ACTS:
        for dtype in (torch.float32, torch.bfloat16):
            gate, up = make_pair((2, 7, 30), dtype, "cpu", "contiguous", 5)
            gate.requires_grad_()
            up.requires_grad_()
            out = swiglu(gate, up, act)
            grad = torch.randn(2, 7, 30).to(dtype)
            out.backward(grad)
            r_out, r_dg, r_du = exact(gate.detach(), up.detach(), act, grad)
            tol = 4 * EPS[dtype] + 1e-6
            assert rel(out.detach(), r_out) <= tol
            assert rel(gate.grad, r_dg) <= tol
            assert rel(up.grad, r_du) <= tol


def test_validation():
    g = torch.randn(4, 8)
    with pytest.raises(TypeError, match="gate"):
        swiglu(g.numpy(), g)
    with pytest.raises(TypeError, match="up"):
        swiglu(g, g.long())
    with pytest.raises(TypeError, match="gate"):
        swiglu(g.double(), g.double())
    with pytest.raises(TypeError, match="up"):
        swiglu(g, g.half())
    with pytest.raises(ValueError, match="up"):
        swiglu(g, g[:, :4])
    with pytest.raises(ValueError, match="act"):
        swiglu(g, g, "tanh")
    with pytest.raises(TypeError, match="act"):
        swiglu(g, g, None)
    with pytest.raises(ValueError, match="gate"):
        swiglu(torch.tensor(1.0), torch.tensor(1.0))
    w = torch.randn(16, 8)
    with pytest.raises(ValueError, match="up_weight"):
        swiglu_mlp(g, w, w[:8], w.t())
    with pytest.raises(ValueError, match="down_weight"):
        swiglu_mlp(g, w, w, w)
    with pytest.raises(ValueError, match="gate_weight"):
        swiglu_mlp(g, w.t(), w, w.t())


# ----------------------------------------------------------------------------- dense MLP
def mlp_steps(device, dtype, T, H, I, act, steps=3, seed=11):
    """Three Adam steps of swiglu_mlp; forward and every gradient vs float64 each step."""
    gen = torch.Generator().manual_seed(seed)
    wg = (torch.randn(I, H, generator=gen) / H**0.5).to(dtype).to(device).requires_grad_()
    wu = (torch.randn(I, H, generator=gen) / H**0.5).to(dtype).to(device).requires_grad_()
    wd = (torch.randn(H, I, generator=gen) / I**0.5).to(dtype).to(device).requires_grad_()
    # Adam bounds each step (~lr per weight); plain SGD on a random-gradient loss grows the
    # weights without limit, and the cancellation that follows is no test of the kernels.
    opt = torch.optim.Adam([wg, wu, wd], lr=1e-3)
    errs = []
    for step in range(steps):
        x = torch.randn(2, T // 2, H, generator=gen).to(dtype).to(device).requires_grad_()
        gout = torch.randn(2, T // 2, H, generator=gen).to(dtype).to(device)
        out = swiglu_mlp(x, wg, wu, wd, act)
        out.backward(gout)
        # float64 oracle on the same (current) weights
        ps = [t.detach().cpu().double().requires_grad_() for t in (x, wg, wu, wd)]
        xd, gd, ud, dd = ps
        ref = F.linear(act64(F.linear(xd, gd), act) * F.linear(xd, ud), dd)
        ref.backward(gout.cpu().double())
        got = [out.detach(), x.grad, wg.grad, wu.grad, wd.grad]
        want = [ref.detach(), xd.grad, gd.grad, ud.grad, dd.grad]
        if dtype == torch.bfloat16:
            # the same formula computed naively by PyTorch in bf16, on the same inputs
            pn = [t.detach().clone().requires_grad_() for t in (x, wg, wu, wd)]
            naive = F.linear(act64(F.linear(pn[0], pn[1]), act) * F.linear(pn[0], pn[2]), pn[3])
            naive.backward(gout)
            base = [naive.detach()] + [t.grad for t in pn]
        else:
            base = [None] * 5
        errs.append([(rel(a.cpu(), b), None if c is None else rel(c.cpu(), b)) for a, b, c in zip(got, want, base)])
        if dtype == torch.bfloat16:
            bounds = mlp_bf16_bounds(*(t.detach() for t in (x, wg, wu, wd, gout)), act)
            for name, a, b, bd in zip(NAMES, got, want, bounds):
                assert_within_bound(a, b, bd, f"step {step} {name}")
        opt.step()
        opt.zero_grad()
    return errs


NAMES = ("out", "d_input", "d_gate", "d_up", "d_down")


def mlp_bf16_bounds(x, wg, wu, wd, gout, act):
    """Per-element error bounds of the bf16 MLP (out, dx, dWg, dWu, dWd) against float64,
    propagated to first order from each rounding the computation makes: every GEMM
    output and every kernel output is rounded once to bf16 (<= 2^-9 relative) after a
    float32 sum of n products (<= n 2^-24 sum|products|); SwiGLU's float32 activation
    is good to a few ulps of |g| (GELU's cancellation); |act''| <= 1."""
    d = lambda t: t.detach().cpu().double().reshape(-1, t.shape[-1])
    x, gout = d(x), d(gout)
    wg, wu, wd = d(wg), d(wu), d(wd)
    T, H = x.shape
    I = wg.shape[0]
    r, u32 = 2.0**-9, 2.0**-24
    ax, awg, awu, awd, ago = x.abs(), wg.abs(), wu.abs(), wd.abs(), gout.abs()
    g, u = x @ wg.t(), x @ wu.t()
    dg_ = r * g.abs() + H * u32 * (ax @ awg.t())
    du_ = r * u.abs() + H * u32 * (ax @ awu.t())
    gg = g.clone().requires_grad_()
    a = act64(gg, act)
    (a1,) = torch.autograd.grad(a.sum(), gg)
    a, a1 = a.detach(), a1.abs()
    curv = 0.0 if act == "relu" else 1.0
    inner = a * u
    d_inner = r * inner.abs() + a1 * u.abs() * dg_ + a.abs() * du_ + 4 * u32 * (g * u).abs()
    out = inner @ wd.t()
    b_out = r * out.abs() + d_inner @ awd.t() + I * u32 * (inner.abs() @ awd.t())
    dinner = gout @ wd
    d_dinner = r * dinner.abs() + H * u32 * (ago @ awd)
    b_dwd = r * (gout.t() @ inner).abs() + ago.t() @ d_inner + T * u32 * (ago.t() @ inner.abs())
    dgate = dinner * u * a1
    b_dgate = (r * dgate.abs() + d_dinner * (u * a1).abs() + dinner.abs() * a1 * du_
               + curv * (dinner * u).abs() * dg_ + 4 * u32 * (dinner * u).abs() * (1 + g.abs()))
    dup = dinner * a
    b_dup = r * dup.abs() + d_dinner * a.abs() + (dinner * a1).abs() * dg_ + 4 * u32 * dinner.abs() * g.abs()
    pg, pu = dgate @ wg, dup @ wu
    b_dx = (r * (pg + pu).abs() + r * (pg.abs() + pu.abs()) + b_dgate @ awg + b_dup @ awu
            + I * u32 * (dgate.abs() @ awg + dup.abs() @ awu))
    b_dwg = r * (dgate.t() @ x).abs() + b_dgate.t() @ ax + T * u32 * (dgate.abs().t() @ ax)
    b_dwu = r * (dup.t() @ x).abs() + b_dup.t() @ ax + T * u32 * (dup.abs().t() @ ax)
    # first-order bounds: 1% for the neglected products of errors
    return [1.01 * b for b in (b_out, b_dx, b_dwg, b_dwu, b_dwd)]


def assert_within_bound(got, want, bound, name):
    got = got.detach().cpu().double().reshape(bound.shape)
    want = want.detach().cpu().double().reshape(bound.shape)
    err = (got - want).abs()
    assert not bool(torch.isnan(err).any()), f"{name}: NaN"
    ratio = err / (bound + 1e-300)
    if bool((ratio > 1).any()):
        i = tuple(torch.nonzero(ratio == ratio.max())[0].tolist())
        raise AssertionError(f"{name}: element {i}: got {got[i].item():.6g}, float64 {want[i].item():.6g}, "
                             f"error {err[i].item():.3g} > bound {bound[i].item():.3g}")


@pytest.mark.parametrize("act", ACTS)
def test_mlp_float32_three_steps(device, act):
    for step, errs in enumerate(mlp_steps(device, torch.float32, 24, 20, 36, act)):
        for name, (e, _) in zip(NAMES, errs):
            assert e <= 1e-5, f"step {step} {name}: rel L2 {e}"


@pytest.mark.parametrize("act", ("silu", "gelu"))
def test_mlp_bf16_no_worse_than_naive(device, act):
    # sizes large enough that the rel. L2 errors are averages over thousands of elements
    for step, errs in enumerate(mlp_steps(device, torch.bfloat16, 256, 64, 128, act)):
        for name, (e, e_naive) in zip(NAMES, errs):
            # Ours rounds once where naive bf16 rounds after each op; allow a sliver for
            # the GEMM roundings both share.
            assert e <= 1.05 * e_naive + 1e-4, f"step {step} {name}: ours {e} vs naive bf16 {e_naive}"


@pytest.mark.skipif(not HAS_CUDA, reason="larger sizes on GPU only")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_mlp_gpu_large(dtype):
    for step, errs in enumerate(mlp_steps("cuda", dtype, 2048, 512, 1408, "silu")):
        for name, (e, e_naive) in zip(NAMES, errs):
            if dtype == torch.float32:
                assert e <= 1e-5, f"step {step} {name}: {e}"
            else:
                assert e <= 1.05 * e_naive + 1e-4, f"step {step} {name}: {e} vs {e_naive}"


@pytest.mark.parametrize("backend", ("eager", "aot_eager"))
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=gen, requires_grad=True)
    w = [torch.randn(24, 16, generator=gen, requires_grad=True),
         torch.randn(24, 16, generator=gen, requires_grad=True),
         torch.randn(16, 24, generator=gen, requires_grad=True)]
    fn = torch.compile(swiglu_mlp, fullgraph=True, backend=backend)
    out = fn(x, *w, "silu")
    out.sum().backward()
    grads = [t.grad.clone() for t in [x] + w]
    for t in [x] + w:
        t.grad = None
    ref = swiglu_mlp(x, *w, "silu")
    ref.sum().backward()
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    for a, t in zip(grads, [x] + w):
        assert torch.allclose(a, t.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act", ACTS)
def test_eager_function_matches_custom_op(device, act):
    """Eager ``swiglu`` runs an autograd.Function, torch.compile the custom ops: both call
    the same implementation, so results and gradients are identical bits."""
    gate, up = make_pair((2, 9, 48), torch.bfloat16, device, "contiguous", seed=8)
    grad = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(device)
    res = []
    for fn in (lambda g, u: swiglu(g, u, act), lambda g, u: torch.ops.omni_moe.swiglu_forward(g, u, act)):
        g = gate.detach().clone().requires_grad_()
        u = up.detach().clone().requires_grad_()
        out = fn(g, u)
        out.backward(grad)
        res.append((out.detach(), g.grad, u.grad))
    for x, y in zip(*res):
        assert torch.equal(x, y)
