"""The import paths of the public flash-algo/omni-moe package, run against this one.

Each path must import, have upstream's signature (parameter names and order), and give
what our public function gives; then the essence of upstream's own kernel tests (its
Triton path against a plain PyTorch formula, forward and backward) is checked on them:
on CPU through the PyTorch paths, and with the kernels (CUDA, or CPU under
``TRITON_INTERPRET=1``).  docs/compatibility.md lists where the semantics differ.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import omni_moe
from omni_moe import OmniMoE, OmniMoEConfig, omni_expert, omni_router
from omni_moe.ops import swiglu_mlp
from omni_moe.ops.triton.omni_expert import triton_omni_expert_func
from omni_moe.ops.triton.omni_mlp import triton_omni_mlp_func
from omni_moe.ops.triton.omni_router import triton_omni_router_func
from omni_moe.ops.router.reference import router_backward_reference
from omni_moe.layers.reference import OmniMoEReference
from conftest import HAS_CUDA
from router_checks import check_router_output

# Upstream's parameter lists (flash-algo/omni-moe, omni_moe/ops/triton/*.py and
# omni_moe/modules/omni_moe.py).
UPSTREAM_SIGNATURES = {
    triton_omni_router_func: ["router_logits_x", "router_logits_y", "num_expert_sqrt",
                              "num_experts_per_token"],
    triton_omni_expert_func: ["hidden_states", "up_weights", "down_weights", "routing_weights",
                              "indices"],
    triton_omni_mlp_func: ["x", "gate_weight", "up_weight", "down_weight"],
}
UPSTREAM_CONFIG_FIELDS = ["hidden_size", "intermediate_size", "hidden_act", "num_experts",
                          "num_experts_per_token"]


@pytest.fixture
def torch_path(monkeypatch):
    """CPU tensors through the PyTorch paths, whatever TRITON_INTERPRET says."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _params(fn):
    return list(inspect.signature(fn).parameters)


@pytest.mark.parametrize("fn", list(UPSTREAM_SIGNATURES), ids=lambda f: f.__name__)
def test_signature(fn):
    assert _params(fn) == UPSTREAM_SIGNATURES[fn]
    assert all(p.default is inspect.Parameter.empty
               for p in inspect.signature(fn).parameters.values())


def test_module_paths():
    from omni_moe.modules.omni_moe import OmniMoE as M, OmniMoEConfig as C

    assert M is omni_moe.OmniMoE and C is omni_moe.OmniMoEConfig
    assert _params(C)[:5] == UPSTREAM_CONFIG_FIELDS
    assert _params(M)[:1] == ["config"]
    assert _params(M.forward)[:2] == ["self", "hidden_states"]


# ----------------------------------------------------------------------------- router
def test_router_path_runs_the_pruned_algorithm(monkeypatch, torch_path):
    """Upstream's path gets the fast exact router; the seed's path stays the full scan."""
    import omni_moe.ops.router.op as r
    from omni_moe.triton.omni_router import triton_omni_router_func as seed_fullscan

    seen = []
    orig = r._forward_impl

    def spy(x, y, k, algorithm, *rest):
        seen.append(algorithm)
        return orig(x, y, k, algorithm, *rest)

    monkeypatch.setattr(r, "_forward_impl", spy)
    x, y = torch.randn(6, 5), torch.randn(6, 5)
    triton_omni_router_func(x, y, 5, 3)
    triton_omni_router_func(x.requires_grad_(), y, 5, 3)
    seed_fullscan(x, y, 5, 3)
    assert seen == ["pruned", "pruned", "fullscan"]


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
