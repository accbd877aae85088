"""The layer's router and output stages as one autograd node each: the unfused path's
results (bitwise, except the input gradient's sum of three terms, within rounding).

Kernels run on CUDA, or on CPU under TRITON_INTERPRET=1 (the router stage is used only
where the fused router prologue is); the output stage also on the PyTorch path.
"""

from __future__ import annotations

import copy

import pytest
import torch

import omni_moe.layers.omni_moe as layer_module
from omni_moe import OmniMoE, OmniMoEConfig, omni_router
from omni_moe.bench.launch_count import autograd_nodes

pytestmark = pytest.mark.usefixtures("no_tf32")


def _unfused_route(layer, h):
    """What OmniMoE.route computed before the stage: four autograd-visible pieces."""
    px, py = layer.router_log_probs(h)
    return omni_router(px, py, layer.num_expert_sqrt, layer.top_k)


@pytest.mark.parametrize("norm,training", [("batchnorm", True), ("batchnorm", False),
                                           ("none", True)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=["fp32", "bf16"])
def test_stage_equals_unfused_bitwise(device, norm, training, dtype):
    torch.manual_seed(4)
    layer = OmniMoE(OmniMoEConfig(24, 40, num_experts=49, num_experts_per_token=5,
                                  router_norm=norm)).to(device).to(dtype)
    twin = copy.deepcopy(layer)
    layer.train(training)
    twin.train(training)
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        x = torch.randn(19, 24, generator=gen).to(dtype).to(device)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        assert layer._fused_router_mode(xa) is not None
        sa, ia = layer.route(xa)
        sb, ib = _unfused_route(twin, xb)
        assert torch.equal(sa, sb) and torch.equal(ia, ib) and ia.dtype == torch.int32
        assert not ia.requires_grad
        g = torch.randn(sa.shape, generator=gen).to(device)
        sa.backward(g)
        sb.backward(g)
        assert torch.equal(xa.grad, xb.grad), step
        for name in ("router_gate_x", "router_gate_y"):
            ga, gb = getattr(layer, name).weight.grad, getattr(twin, name).weight.grad
            assert torch.equal(ga, gb), (step, name)
        for (n, a), (_, b) in zip(layer.named_buffers(), twin.named_buffers()):
            assert torch.equal(a, b), (step, n)
    # Only the weights need gradients (frozen input): still exact.
    layer.zero_grad()
    twin.zero_grad()
    layer.route(x)[0].sum().backward()
    _unfused_route(twin, x)[0].sum().backward()
    assert torch.equal(layer.router_gate_y.weight.grad, twin.router_gate_y.weight.grad)


def test_stage_is_one_node(device):
    layer = OmniMoE(OmniMoEConfig(16, 24, num_experts=36, num_experts_per_token=3)).to(device)
    x = torch.randn(10, 16, device=device, requires_grad=True)
    scores, _ = layer.route(x)
    nodes = autograd_nodes(scores)
    assert nodes == {"_RouterStageBackward": 1, "AccumulateGrad": 3}, dict(nodes)
    with torch.no_grad():
        s2, i2 = layer.route(x)
    assert s2.grad_fn is None and s2.shape == (10, 3)


@pytest.mark.parametrize("sparse", (False, True), ids=["dense", "sparse"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=["fp32", "bf16"])
def test_output_stage_equals_unfused(path, dtype, sparse, monkeypatch):
    torch.manual_seed(6)
    layer = OmniMoE(OmniMoEConfig(24, 40, num_experts=49, num_experts_per_token=5,
                                  sparse_expert_grad=sparse)).to(path).to(dtype)
    twin = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(7)
    for step in range(2):
        x = torch.randn(3, 7, 24, generator=gen).to(dtype).to(path)
        g = torch.randn(3, 7, 24, generator=gen).to(dtype).to(path)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        oa = layer(xa)
        assert oa.grad_fn is not None and type(oa.grad_fn).__name__ == "ViewBackward0"
        assert type(oa.grad_fn.next_functions[0][0]).__name__ == "_OutputStageBackward"
        with monkeypatch.context() as m:
            m.setattr(layer_module, "output_stage", lambda *a: None)   # the unfused path
            ob = twin(xb)
        assert torch.equal(oa, ob)
        oa.backward(g)
        ob.backward(g)
        for (n, p), (_, q) in zip(layer.named_parameters(), twin.named_parameters()):
            gp, gq = p.grad, q.grad
            if gp.is_sparse:
                assert gq.is_sparse
                gp, gq = gp.coalesce(), gq.coalesce()
                assert torch.equal(gp.indices(), gq.indices())
                gp, gq = gp.values(), gq.values()
            assert torch.equal(gp, gq), (step, n)
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(xa.grad, xb.grad, **tol)
        for p in list(layer.parameters()) + list(twin.parameters()):
            p.grad = None


def test_output_stage_hook_falls_back(device):
    """A forward hook on an MLP module: the unfused path (which calls the module)."""
    layer = OmniMoE(OmniMoEConfig(16, 24, num_experts=36, num_experts_per_token=3)).to(device)
    calls = []
    layer.up_proj.register_forward_hook(lambda m, i, o: calls.append(1))
    out = layer(torch.randn(5, 16, device=device))
    assert calls == [1] and type(out.grad_fn).__name__ == "AddmmBackward0"
