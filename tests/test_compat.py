"""The import paths of the public upstream omni-moe package (github.com/HKUSTDial/omni-moe,
formerly flash-algo/omni-moe), in its earlier and newest versions, run against this one.

Each path must import, have upstream's signature (parameter names and order), and give
what our public function gives; then the essence of upstream's own kernel tests (its
Triton path against a plain PyTorch formula, forward and backward) is checked on them:
on CPU through the PyTorch paths, and with the kernels (CUDA, or CPU under
``TRITON_INTERPRET=1``).  The newest version's layer paths: ``OmniMoE_Torch`` against
``OmniMoE`` (outputs, gradients, state_dicts both ways), and checkpoints whose expert
count is not a perfect square.  docs/compatibility.md lists where the semantics differ.
"""

from __future__ import annotations

import importlib
import inspect
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import omni_moe
from omni_moe import OmniMoE, OmniMoEConfig, UnroutedExpertsWarning, omni_expert, omni_router
from omni_moe.ops import swiglu_mlp
from omni_moe.ops.triton.omni_expert import triton_omni_expert_func
from omni_moe.ops.triton.omni_mlp import triton_omni_mlp_func
from omni_moe.ops.triton.omni_router import triton_omni_router_func
from omni_moe.ops.router.reference import router_backward_reference
from omni_moe.layers.reference import OmniMoEReference
from omni_moe.modules.omni_moe import OmniMoE_Torch
from conftest import HAS_CUDA
from router_checks import check_router_output

# Upstream's parameter lists, by import path: the per-op modules of its earlier version
# (2026-02), and ``interface``, re-exported by ``omni_moe.ops.triton``, of its newest.
_ROUTER = ["router_logits_x", "router_logits_y", "num_expert_sqrt", "num_experts_per_token"]
_MLP = ["x", "gate_weight", "up_weight", "down_weight"]
UPSTREAM_SIGNATURES = {
    "omni_moe.ops.triton.omni_router.triton_omni_router_func": _ROUTER,
    "omni_moe.ops.triton.omni_expert.triton_omni_expert_func":
        ["hidden_states", "up_weights", "down_weights", "routing_weights", "indices"],
    "omni_moe.ops.triton.omni_mlp.triton_omni_mlp_func": _MLP,
    **{f"{mod}.{name}": params
       for mod in ("omni_moe.ops.triton.interface", "omni_moe.ops.triton")
       for name, params in (
           ("triton_omni_router_func", _ROUTER),
           ("triton_omni_expert_func",
            ["x", "up_weight", "down_weight", "routing_weights", "indices"]),
           ("triton_omni_mlp_func", _MLP))},
}
UPSTREAM_CONFIG_FIELDS = ["hidden_size", "intermediate_size", "hidden_act", "num_experts",
                          "num_experts_per_token"]


def _resolve(path):
    mod, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(mod), name)


def _params(fn):
    return list(inspect.signature(fn).parameters)


@pytest.mark.parametrize("path", list(UPSTREAM_SIGNATURES))
def test_signature(path):
    fn = _resolve(path)
    assert _params(fn) == UPSTREAM_SIGNATURES[path]
    assert all(p.default is inspect.Parameter.empty
               for p in inspect.signature(fn).parameters.values())


def test_newest_package_exports():
    """``from omni_moe.ops.triton import ...`` gives the interface module's functions."""
    import omni_moe.ops.triton as pkg
    from omni_moe.ops.triton import interface

    names = {"triton_omni_router_func", "triton_omni_expert_func", "triton_omni_mlp_func"}
    assert set(pkg.__all__) == set(interface.__all__) == names
    assert all(getattr(pkg, n) is getattr(interface, n) for n in names)


def test_module_paths():
    from omni_moe.modules.omni_moe import OmniMoE as M, OmniMoEConfig as C

    assert M is omni_moe.OmniMoE and C is omni_moe.OmniMoEConfig
    assert _params(C)[:5] == UPSTREAM_CONFIG_FIELDS
    for cls in (M, OmniMoE_Torch):
        assert _params(cls)[:1] == ["config"]
        assert _params(cls.forward)[:2] == ["self", "hidden_states"]


# ----------------------------------------------------------------------------- router
def test_router_path_runs_the_pruned_algorithm(monkeypatch, torch_path):
    """Upstream's paths get the fast exact router; the seed's path stays the full scan."""
    import omni_moe.ops.router.op as r
    from omni_moe.ops.triton import triton_omni_router_func as newest
    from omni_moe.triton.omni_router import triton_omni_router_func as seed_fullscan

    seen = []
    orig = r.router_forward_impl

    def spy(x, y, k, algorithm, *rest):
        seen.append(algorithm)
        return orig(x, y, k, algorithm, *rest)

    monkeypatch.setattr(r, "router_forward_impl", spy)
    x, y = torch.randn(6, 5), torch.randn(6, 5)
    triton_omni_router_func(x, y, 5, 3)
    triton_omni_router_func(x.requires_grad_(), y, 5, 3)
    seed_fullscan(x, y, 5, 3)
    newest(x, y, 5, 3)
    assert seen == ["pruned", "pruned", "fullscan", "pruned"]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("T,N,k", [(9, 4, 3), (17, 8, 16), (5, 3, 9), (0, 4, 2)])
def test_router_equals_ours(T, N, k, dtype, torch_path):
    g = torch.Generator().manual_seed(T * 100 + N * 10 + k)
    x = torch.randn(T, N, generator=g).to(dtype).requires_grad_()
    y = torch.randn(T, N, generator=g).to(dtype).requires_grad_()
    s, i = triton_omni_router_func(x, y, N, k)
    s2, i2 = omni_router(x.detach(), y.detach(), N, k)
    assert torch.equal(s.detach(), s2) and torch.equal(i, i2)
    assert s.dtype == dtype and i.dtype == torch.int32
    check_router_output(x.detach(), y.detach(), k, s.detach(), i)
    gs = torch.randn(T, k, generator=g).to(dtype)
    s.backward(gs)
    # d scores[t, r] / d x[t, i] = [indices[t, r] div N == i]: a scatter of gs (float32
    # sums, one rounding).
    rdx, rdy = router_backward_reference(gs, i, N)
    assert torch.equal(x.grad, rdx) and torch.equal(y.grad, rdy)
    dx = torch.zeros(T, N, dtype=torch.float64).scatter_add_(1, i.long() // N, gs.double())
    torch.testing.assert_close(x.grad.double(), dx, **TOL[dtype])


def test_newest_paths_equal_ours(path):
    """The newest upstream's imports (``from omni_moe.ops.triton import ...``), called
    positionally and by upstream's parameter names, give exactly our functions' results."""
    from omni_moe.ops import triton as pkg

    g = torch.Generator().manual_seed(7)
    T, N, k = 7, 5, 5                       # N not a power of two, odd k
    x, y = (torch.randn(T, N, generator=g).to(path) for _ in range(2))
    s, i = omni_router(x, y, N, k)
    for s2, i2 in (pkg.triton_omni_router_func(x, y, N, k),
                   pkg.triton_omni_router_func(router_logits_x=x, router_logits_y=y,
                                               num_expert_sqrt=N, num_experts_per_token=k)):
        assert torch.equal(s2, s) and torch.equal(i2, i)
    args = _expert_inputs(9, 12, 10, 3, torch.float32, path, seed=8)
    ref = omni_expert(*args, act="silu")
    names = ("x", "up_weight", "down_weight", "routing_weights", "indices")
    assert torch.equal(pkg.triton_omni_expert_func(*args), ref)
    assert torch.equal(pkg.triton_omni_expert_func(**dict(zip(names, args))), ref)
    args = _mlp_inputs(6, 12, 20, torch.float32, path, seed=9)
    ref = swiglu_mlp(*args, "silu")
    assert torch.equal(pkg.triton_omni_mlp_func(*args), ref)
    assert torch.equal(pkg.triton_omni_mlp_func(**dict(zip(_MLP, args))), ref)


# ----------------------------------------------------------------------------- expert
def _expert_formula(h, up, down, w, idx):
    """The atomic-expert formula as upstream's PyTorch baseline writes it: gather, silu of
    the dot products, times the routing weights, mixed through the down rows."""
    a = torch.einsum("tkh,th->tk", up[idx.long()], h)
    return torch.einsum("tk,tkh->th", F.silu(a) * w, down[idx.long()])


def _expert_inputs(T, H, E, k, dtype, device, seed):
    # Upstream's test data: hidden N(0, 0.5), embeddings and routing weights N(0, 0.1)
    # (signed: routing_weights are plain multipliers), int32 indices with repeats.
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, H, generator=g) * 0.5).to(dtype).to(device)
    up = (torch.randn(E, H, generator=g) * 0.1).to(dtype).to(device)
    down = (torch.randn(E, H, generator=g) * 0.1).to(dtype).to(device)
    w = (torch.randn(T, k, generator=g) * 0.1).to(dtype).to(device)
    idx = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32).to(device)
    return h, up, down, w, idx


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_expert_equals_ours(dtype, torch_path):
    args = _expert_inputs(13, 24, 16, 5, dtype, "cpu", seed=1)
    out = triton_omni_expert_func(*args)
    assert out.dtype == dtype and out.shape == (13, 24)
    assert torch.equal(out, omni_expert(*args, act="silu"))


# ----------------------------------------------------------------------------- mlp
def _mlp_formula(x, wg, wu, wd):
    return (F.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t()


def _mlp_inputs(T, H, I, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, H, generator=g) * 0.5).to(dtype).to(device)
    ws = [(torch.randn(*s, generator=g) * 0.1).to(dtype).to(device) for s in ((I, H), (I, H), (H, I))]
    return (x, *ws)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_mlp_equals_ours(dtype, torch_path):
    args = _mlp_inputs(11, 24, 40, dtype, "cpu", seed=2)
    out = triton_omni_mlp_func(*args)
    assert out.dtype == dtype and out.shape == (11, 24)
    assert torch.equal(out, swiglu_mlp(*args, "silu"))


# ------------------------------------------------- upstream's kernel tests, in essence
# Upstream checks its Triton functions against the PyTorch formula at bf16 with
# rtol = atol = 1e-2, forward and (through loss = out.sum()) backward.  Here the oracle is
# that formula in float64 on the same (rounded) inputs, and the tolerance is the dtype's.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def _grads_vs_float64(fn, formula, args, float_args, dtype):
    leaves = [a.detach().clone().requires_grad_() if j in float_args else a
              for j, a in enumerate(args)]
    out = fn(*leaves)
    out.sum().backward()
    ref_leaves = [a.detach().double().requires_grad_() if j in float_args else a
                  for j, a in enumerate(args)]
    ref = formula(*ref_leaves)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    for j in float_args:
        torch.testing.assert_close(leaves[j].grad.double(), ref_leaves[j].grad, **TOL[dtype])


def _upstream_essence(device, dtype):
    # Router (upstream: test_router.py): scores against per-axis topk + grid topk.
    T, N, k = 33, 8, 6
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, N, generator=g).to(dtype).to(device).requires_grad_()
    y = torch.randn(T, N, generator=g).to(dtype).to(device).requires_grad_()
    s, i = triton_omni_router_func(x, y, N, k)
    sx, ix = x.detach().double().topk(N, dim=-1)
    sy, iy = y.detach().double().topk(N, dim=-1)
    ref_s = (sx[:, :, None] + sy[:, None, :]).reshape(T, -1).topk(k, dim=-1).values
    torch.testing.assert_close(s.detach().double(), ref_s, **TOL[dtype])
    check_router_output(x.detach(), y.detach(), k, s.detach(), i)
    s.sum().backward()
    cnt_x = torch.zeros(T, N, dtype=torch.float64).scatter_add_(
        1, i.long().cpu() // N, torch.ones(T, k, dtype=torch.float64))
    assert torch.equal(x.grad.double().cpu(), cnt_x)
    # Experts (upstream: test_expert.py) and the shared MLP (test_mlp.py).
    _grads_vs_float64(triton_omni_expert_func, _expert_formula,
                      _expert_inputs(40, 32, 64, 6, dtype, device, seed=4), (0, 1, 2, 3), dtype)
    _grads_vs_float64(triton_omni_mlp_func, _mlp_formula,
                      _mlp_inputs(24, 32, 48, dtype, device, seed=5), (0, 1, 2, 3), dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_upstream_essence_torch_path(dtype, torch_path):
    _upstream_essence("cpu", dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_upstream_essence_kernels(device, dtype):
    """The same through the Triton kernels (CUDA, or the interpreter at these sizes)."""
    _upstream_essence(device, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="upstream's test sizes need CUDA")
@pytest.mark.parametrize("case", [("router", 1024, 256, 32), ("expert", 1024, 1024, 65536, 32),
                                  ("mlp", 1024, 1024, 4096)], ids=lambda c: c[0])
def test_upstream_sizes_gpu(case):
    """A few of upstream's own test cases (bf16, its sizes), forward and backward."""
    dtype, dev = torch.bfloat16, "cuda"
    if case[0] == "router":
        T, N, k = case[1:]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, N, generator=g).to(dtype).to(dev).requires_grad_()
        y = torch.randn(T, N, generator=g).to(dtype).to(dev).requires_grad_()
        s, i = triton_omni_router_func(x, y, N, k)
        # Sums of two bf16 values are exact in float64: the top-k values, rounded to bf16,
        # must be ours exactly.
        sx, _ = x.detach().double().topk(N, dim=-1)
        sy, _ = y.detach().double().topk(N, dim=-1)
        ref = (sx[:, :, None] + sy[:, None, :]).reshape(T, -1).topk(k, dim=-1).values
        assert torch.equal(s.detach(), ref.to(dtype))
        gs = torch.randn(T, k, device=dev).to(dtype)
        s.backward(gs)
        rdx, rdy = router_backward_reference(gs.cpu(), i.cpu(), N)
        assert torch.equal(x.grad.cpu(), rdx) and torch.equal(y.grad.cpu(), rdy)
    elif case[0] == "expert":
        T, H, E, k = case[1:]
        _grads_vs_float64(triton_omni_expert_func, _expert_formula,
                          _expert_inputs(T, H, E, k, dtype, dev, seed=0), (0, 1, 2, 3), dtype)
    else:
        # At this size the bf16 roundings of the (T, I) gate and up products alone put
        # ~13 % of the outputs outside upstream's 1e-2 bounds against float64 (upstream
        # compares with the same formula in bf16, which rounds alike).  So: no worse than
        # that bf16 formula, against float64.
        T, H, I = case[1:]
        args = _mlp_inputs(T, H, I, dtype, dev, seed=0)
        ours, naive, ref = (_values_and_grads(fn, args, t) for fn, t in
                            ((triton_omni_mlp_func, dtype), (_mlp_formula, dtype),
                             (_mlp_formula, torch.float64)))
        for name, a, b, r in zip(("out", "dx", "dwg", "dwu", "dwd"), ours, naive, ref):
            e, e_naive = ((v.double() - r).norm() / r.norm() for v in (a, b))
            assert e <= 1.05 * e_naive + 1e-4, f"{name}: rel. L2 {e:.3g} vs bf16 formula {e_naive:.3g}"
            m, m_naive = ((v.double() - r).abs().max() for v in (a, b))
            assert m <= 2 * m_naive, f"{name}: max error {m:.3g} vs bf16 formula {m_naive:.3g}"


def _values_and_grads(fn, args, dtype):
    """fn(*args) and the gradients of its sum, with the inputs cast to ``dtype``."""
    leaves = [a.detach().to(dtype).requires_grad_() for a in args]
    out = fn(*leaves)
    out.sum().backward()
    return [out.detach()] + [a.grad for a in leaves]


# ----------------------------------------------------------------------------- module
def _upstream_layer_formula(layer, h):
    """Upstream's OmniMoE formula, written from its description, in the parameters'
    dtype: BatchNorm'd per-axis logits, log_softmax, product-grid top-k, exp, SiLU atomic
    experts plus the shared SwiGLU MLP."""
    px = F.log_softmax(layer.router_norm_x(layer.router_gate_x(h)), dim=-1)
    py = F.log_softmax(layer.router_norm_y(layer.router_gate_y(h)), dim=-1)
    T, N = px.shape
    grid = (px[:, :, None] + py[:, None, :]).reshape(T, N * N)
    scores, idx = grid.topk(layer.top_k, dim=-1)
    experts = _expert_formula(h, layer.up_embed.weight, layer.down_embed.weight, scores.exp(), idx)
    return _mlp_formula(h, layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight) + experts


@pytest.mark.parametrize("train", (True, False))
def test_module_like_upstream(train, torch_path):
    """Upstream's usage: positional config, a 3-D input, a state_dict in its layout."""
    torch.manual_seed(0)
    config = OmniMoEConfig(32, 64, "silu", 16, 4)
    layer = OmniMoE(config).train(train)
    # A state_dict as upstream's module holds it (its nn.Embedding init is N(0, 1)).
    sd = {name: torch.randn_like(t) * (1.0 if "embed" in name else 0.1)
          for name, t in layer.state_dict().items() if t.is_floating_point()}
    sd["router_norm_x.running_var"] = sd["router_norm_x.running_var"].abs() + 0.5
    sd["router_norm_y.running_var"] = sd["router_norm_y.running_var"].abs() + 0.5
    layer.load_state_dict(sd, strict=False)
    ref_layer = OmniMoEReference.from_module(layer, torch.float64)  # plain float64 BatchNorm
    x = torch.randn(2, 7, 32)
    out = layer(x)
    assert out.shape == (2, 7, 32) and out.dtype == torch.float32
    ref = _upstream_layer_formula(ref_layer, x.double().reshape(-1, 32)).reshape(2, 7, 32)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- OmniMoE_Torch, the twin
F32 = dict(rtol=1e-5, atol=1e-5)   # float32 rounding: the two sum in different orders


def _run(m, x, gout, train):
    """Output, routing in expert order (OmniMoE promises no order within a token), input
    gradient, parameter gradients and buffers of one training or eval step of ``m``."""
    m.train(train).zero_grad()
    xr = x.clone().requires_grad_()
    out, (s, i) = m(xr, return_routing=True)
    out.backward(gout)
    i_sorted, perm = i.long().sort(dim=-1)
    return (out.detach(), i_sorted, s.detach().float().gather(-1, perm), i.dtype, xr.grad,
            {n: p.grad for n, p in m.named_parameters()},
            {n: b.clone() for n, b in m.named_buffers()})


def _check_twins(layer, twin, x):
    """``layer`` and ``twin`` (same state) on ``x``, a training step (batch statistics)
    then an eval step (the running ones it updated): the same experts, and outputs,
    scores, gradients and router statistics equal within float32 rounding."""
    g = torch.Generator().manual_seed(11)
    for train in (True, False):
        gout = torch.randn(x.shape, generator=g).to(x.device)
        a, b = _run(layer, x, gout, train), _run(twin, x, gout, train)
        assert a[3] == b[3] == torch.int32
        assert torch.equal(a[1], b[1]), f"train={train}: other experts"
        for name, u, v in (("out", a[0], b[0]), ("scores", a[2], b[2]), ("dx", a[4], b[4])):
            torch.testing.assert_close(v, u, **F32, msg=lambda m: f"train={train} {name}: {m}")
        for d1, d2 in ((a[5], b[5]), (a[6], b[6])):
            assert list(d1) == list(d2)
            for n in d1:
                torch.testing.assert_close(d2[n].to(d1[n].dtype), d1[n], **F32,
                                           msg=lambda m: f"train={train} {n}: {m}")
    return a, b


def _state_like_upstream(H, I, E, seed, router_norm="batchnorm", unrouted_nan=False):
    """A state_dict in the layout upstream's module gives these sizes, by its rules
    (N = floor(sqrt(E)) router rows, E table rows): embeddings N(0, 1), the rest small,
    running variances > 0; BatchNorm buffers only with ``router_norm="batchnorm"`` (the
    other norms are this package's and hold none).  With ``unrouted_nan`` the table rows
    past N*N are NaN, so any use of them shows in the outputs or gradients."""
    N = math.floor(math.sqrt(E))
    g = torch.Generator().manual_seed(seed)
    shapes = {"gate_proj.weight": (I, H), "up_proj.weight": (I, H), "down_proj.weight": (H, I),
              "router_gate_x.weight": (N, H), "router_gate_y.weight": (N, H)}
    sd = {name: torch.randn(shape, generator=g) * 0.1 for name, shape in shapes.items()}
    if router_norm == "batchnorm":
        for ax in "xy":
            sd[f"router_norm_{ax}.running_mean"] = torch.randn(N, generator=g) * 0.1
            sd[f"router_norm_{ax}.running_var"] = torch.rand(N, generator=g) + 0.5
            sd[f"router_norm_{ax}.num_batches_tracked"] = torch.tensor(7)
    for name in ("up_embed.weight", "down_embed.weight"):
        sd[name] = torch.randn(E, H, generator=g)
        if unrouted_nan:
            sd[name][N * N:] = float("nan")
    return sd


def _unrouted(rec):
    return [w for w in rec if issubclass(w.category, UnroutedExpertsWarning)]


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("norm", ("batchnorm", "layernorm", "none"))
def test_torch_twin_matches_layer(path, norm):
    """``OmniMoE_Torch`` is built like ``OmniMoE`` (same seed: same state), loads its
    state_dict, computes the same layer, and its state_dict (statistics updated by a
    training step) loads back into ``OmniMoE``."""
    config = OmniMoEConfig(16, 24, "silu", 36, 5, router_norm=norm)    # N = 6, odd k
    torch.manual_seed(3)
    layer = OmniMoE(config)
    torch.manual_seed(3)
    twin = OmniMoE_Torch(config)
    a, b = layer.state_dict(), twin.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)
    layer.load_state_dict(_state_like_upstream(16, 24, 36, seed=4, router_norm=norm))
    twin.load_state_dict(layer.state_dict())
    layer, twin = layer.to(path), twin.to(path)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(5)).to(path)
    _check_twins(layer, twin, x)
    back = OmniMoE(config).to(path)
    back.load_state_dict(twin.state_dict())
    assert all(torch.equal(t, twin.state_dict()[n]) for n, t in back.state_dict().items())
    out = twin.eval()(x[:, :0])                                # an empty batch
    assert out.shape == (2, 0, 16)


def test_torch_twin_argument_errors():
    config = OmniMoEConfig(16, 24, "silu", 9, 2)
    with pytest.raises(TypeError, match="^config must be an OmniMoEConfig"):
        OmniMoE_Torch(dict(hidden_size=16))
    with pytest.raises(ValueError, match="sync_router_stats"):
        OmniMoE_Torch(OmniMoEConfig(16, 24, "silu", 9, 2, sync_router_stats=True))
    twin = OmniMoE_Torch(config)
    for bad, exc in ((torch.randn(3, 16).tolist(), TypeError), (torch.randn(3, 16).double(), TypeError),
                     (torch.randn(3, 15), ValueError), (torch.randn(3, 16).to_sparse(), TypeError)):
        with pytest.raises(exc, match="^hidden_states"):
            twin(bad)
    with pytest.raises(TypeError, match="^return_routing"):
        twin(torch.randn(3, 16), return_routing=1)


# --------------------------------------------------- checkpoints of a non-square count
@pytest.mark.usefixtures("no_tf32")
def test_non_square_checkpoint(path):
    """An upstream checkpoint with num_experts = 14 (upstream's router: N = 3, rows 0..8 of
    its 14-row tables) loads into ``OmniMoE`` and ``OmniMoE_Torch`` with one warning in
    all; rows 9..13 hold NaN, and no output or gradient sees them: the router reaches
    only rows below N*N, the kernels read no other row, those rows get zero gradient
    (dense, and no row of the sparse one)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        config = OmniMoEConfig(16, 24, "silu", 14, 5)
        layer, twin = OmniMoE(config), OmniMoE_Torch(config)
        sd = _state_like_upstream(16, 24, 14, seed=6, unrouted_nan=True)
        layer.load_state_dict(sd)
        twin.load_state_dict(sd)
        layer, twin = layer.to(path), twin.to(path)
        x = torch.randn(11, 16, generator=torch.Generator().manual_seed(7)).to(path)
        a, b = _check_twins(layer, twin, x)
        sparse = OmniMoE(OmniMoEConfig(16, 24, "silu", 14, 5, sparse_expert_grad=True))
        sparse.load_state_dict(sd)
        sparse.to(path)(x).sum().backward()
    assert len(_unrouted(rec)) == 2                 # the two configs, nothing else
    assert layer.num_expert_sqrt == 3 and layer.up_embed.weight.shape == (14, 16)
    assert a[1].max() < 9 and b[1].max() < 9
    for grads in (a[5], b[5]):
        for n in ("up_embed.weight", "down_embed.weight"):
            assert torch.isfinite(grads[n]).all() and not grads[n][9:].any(), n
            assert grads[n][:9].any(dim=1).sum() >= 5, n
    for emb in (sparse.up_embed, sparse.down_embed):
        gs = emb.weight.grad.coalesce()
        assert gs.shape == (14, 16) and gs.indices().max() < 9 and torch.isfinite(gs.values()).all()
