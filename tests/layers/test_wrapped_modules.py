"""Modules wrapped by an adapter (the way peft's LoRA wraps them: its own forward, the
wrapped module's ``weight`` exposed as an attribute).

The layer's fused paths read weights instead of calling modules; a wrapped Linear must
be called (its output is what the model computes), a wrapped expert table is refused.
Kernels (CUDA / interpreter) and the PyTorch path, every router norm, two calls.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from omni_moe import OmniMoE, OmniMoEConfig

pytestmark = pytest.mark.usefixtures("no_tf32")

LINEARS = ("gate_proj", "up_proj", "down_proj", "router_gate_x", "router_gate_y")
H = 24


class AddDelta(nn.Module):
    """``base(x) + x @ delta^T`` with ``weight`` forwarding to ``base.weight``, as peft's
    LoRA layers expose the weight they wrap."""

    def __init__(self, base: nn.Linear, g: torch.Generator):
        super().__init__()
        self.base = base
        self.delta = nn.Parameter(0.3 * torch.randn(base.weight.shape, generator=g).to(base.weight.device))

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        return self.base(x) + F.linear(x, self.delta)


def layer_cfg(norm):
    return OmniMoEConfig(hidden_size=H, intermediate_size=40, num_experts=49, num_experts_per_token=5,
                         router_norm=norm)


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", "none"])
def test_wrapped_linears_are_called_not_read(path, norm):
    """Each Linear of the layer wrapped with its own forward gives the layer whose weights
    are the sums (``base + delta``): forward, input gradient and the gradients of both
    parts, on every call."""
    torch.manual_seed(5)
    layer = OmniMoE(layer_cfg(norm)).to(path).train()
    twin = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(6)
    for name in LINEARS:
        setattr(layer, name, AddDelta(getattr(layer, name), g))
    for call in range(2):
        with torch.no_grad():
            for name in LINEARS:
                w = getattr(layer, name)
                getattr(twin, name).weight.copy_(w.base.weight + w.delta)
        x = torch.randn(13, H, device=path)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, ref = layer(xa), twin(xb)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"call {call}")
        dout = torch.randn_like(out)
        out.backward(dout)
        ref.backward(dout)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
        for name in LINEARS:
            w, want = getattr(layer, name), getattr(twin, name).weight.grad
            torch.testing.assert_close(w.delta.grad, want, rtol=1e-5, atol=1e-5, msg=name)
            torch.testing.assert_close(w.base.weight.grad, want, rtol=1e-5, atol=1e-5, msg=name)
        for m in (layer, twin):
            m.zero_grad(set_to_none=True)
        with torch.no_grad():  # new deltas: the next call must see them
            for name in LINEARS:
                getattr(layer, name).delta.add_(0.2 * torch.randn(getattr(layer, name).delta.shape, generator=g).to(path))


class TableAdapter(nn.Module):
    """An adapter around an expert table: its own forward, the table's attributes
    forwarded (so nothing but the check can tell it is bypassed)."""

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base_layer = base

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def sparse(self):
        return self.base_layer.sparse

    def forward(self, idx):
        return self.base_layer(idx) * 2


@pytest.mark.parametrize("name", ["up_embed", "down_embed"])
def test_wrapped_expert_table_raises(path, name):
    layer = OmniMoE(layer_cfg("batchnorm")).to(path)
    x = torch.randn(6, H, device=path)
    layer(x)  # plain tables: fine
    setattr(layer, name, TableAdapter(getattr(layer, name)))
    with pytest.raises(ValueError) as e:
        layer(x)
    msg = str(e.value)
    assert msg.startswith(f"{name} is a ") and "TableAdapter" in msg and "\n" not in msg
    assert "modules_to_save" in msg and "router_gate_x" in msg
