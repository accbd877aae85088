"""router_norm="layernorm": per-token LayerNorm (no affine) of each router axis.

Exact against the float64 reference over three training steps (PyTorch path, and the
kernels under TRITON_INTERPRET=1 / CUDA), and causal: a token's output never depends
on other tokens of the batch (BatchNorm's does, in training).
"""

import pytest
import torch

from omni_moe import OmniMoE, OmniMoEConfig
from omni_moe.layers import RouterLayerNorm
from omni_moe.layers.reference import OmniMoEReference


def _cfg(norm="layernorm", H=24, I=40, E=36, k=5, act="silu"):
    return OmniMoEConfig(hidden_size=H, intermediate_size=I, hidden_act=act, num_experts=E,
                         num_experts_per_token=k, router_norm=norm)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _three_steps(config, shape, device):
    torch.manual_seed(0)
    layer = OmniMoE(config).to(device)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(shape, generator=g).to(device).requires_grad_()
        gout = torch.randn(shape, generator=g).to(device)
        ref = OmniMoEReference.from_module(layer, torch.float64)
        free = OmniMoEReference.from_module(layer, torch.float64)
        out, (scores, idx) = layer(x, return_routing=True)
        out.backward(gout)
        xd = x.detach().double().requires_grad_()
        rout, (rscores, _) = ref(xd, indices=idx, return_routing=True)
        rout.backward(gout.double())
        with torch.no_grad():
            _, (fscores, _) = free(xd.detach(), return_routing=True)
        # Our experts are the float64 top-k up to float32 rounding.
        gap = (rscores.sort(-1, descending=True).values - fscores).abs().max().item()
        assert gap <= 1e-5 * max(1.0, fscores.abs().max().item()), f"step {step}: routing gap {gap}"
        assert _rel(scores, rscores) <= 1e-5, step
        assert _rel(out, rout) <= 1e-5, step
        assert _rel(x.grad, xd.grad) <= 1e-5, step
        rparams = dict(ref.named_parameters())
        for name, p in layer.named_parameters():
            assert _rel(p.grad, rparams[name].grad) <= 1e-5, (step, name)
        opt.step()
        opt.zero_grad()


def test_layernorm_module_has_no_state_and_matches_formula():
    c = _cfg()
    layer = OmniMoE(c)
    assert isinstance(layer.router_norm_x, RouterLayerNorm)
    assert not any("router_norm" in k for k in layer.state_dict())
    x = torch.randn(7, c.num_expert_sqrt, dtype=torch.float64)
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    want = (x - mu) / torch.sqrt(var + 1e-5)
    got = layer.router_norm_x(x.to(torch.bfloat16))
    assert got.dtype == torch.float32  # normalised in float32 whatever the input dtype
    torch.testing.assert_close(layer.router_norm_x(x.float()).double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", [dict(), dict(H=16, I=24, E=49, k=3, act="relu")])
def test_layernorm_three_steps_torch_path(monkeypatch, case):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _three_steps(_cfg(**case), (2, 9, case.get("H", 24)), "cpu")


def test_layernorm_three_steps_kernels(device):
    _three_steps(_cfg(), (2, 9, 24), device)


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
def test_causality_in_training(monkeypatch, norm):
    """Changing the last token changes earlier tokens' outputs only under batchnorm."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    layer = OmniMoE(_cfg(norm)).train()
    x = torch.randn(1, 12, 24)
    y = x.clone()
    y[:, -1] += 3.0
    a, b = layer(x)[:, :-1], layer(y)[:, :-1]
    if norm == "layernorm":
        assert torch.equal(a, b)
    else:
        assert not torch.allclose(a, b)


def test_config_rejects_unknown_norm():
    with pytest.raises(ValueError, match="router_norm"):
        _cfg("rmsnorm")
