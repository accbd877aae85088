"""Clear errors for bad input: OmniMoE.forward's checks, and unsupported tensor layouts
(sparse, nested) in every public function.  PyTorch paths only (no kernel runs)."""

from __future__ import annotations

import pytest
import torch

from omni_moe import OmniMoE, OmniMoEConfig, omni_expert, omni_router, swiglu
from omni_moe.ops import swiglu_mlp


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def layer(norm="batchnorm", dtype=torch.float32):
    torch.manual_seed(0)
    return OmniMoE(OmniMoEConfig(16, 24, "silu", 16, 3, router_norm=norm)).to(dtype)


# ----------------------------------------------------------------------------- OmniMoE
@pytest.mark.parametrize("bad,exc,match", [
    ([0.0] * 16, TypeError, "hidden_states must be a torch.Tensor"),
    (torch.ones(2, 16, dtype=torch.int64), TypeError, "hidden_states must be a floating-point tensor, got torch.int64"),
    (torch.ones(2, 16, dtype=torch.bool), TypeError, "floating-point"),
    (torch.randn(2, 15), ValueError, r"hidden_states must have shape \(\.\.\., hidden_size=16\), got \(2, 15\)"),
    (torch.tensor(1.0), ValueError, "hidden_size=16"),
])
def test_layer_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        layer()(bad)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float64), ids=str)
def test_layer_dtype_mismatch_names_both(dtype):
    with pytest.raises(TypeError, match=rf"hidden_states has dtype {dtype} but OmniMoE's parameters are torch.float32"):
        layer()(torch.randn(2, 16).to(dtype))
    with pytest.raises(TypeError, match=rf"has dtype torch.float32 but OmniMoE's parameters are torch.bfloat16"):
        layer(dtype=torch.bfloat16)(torch.randn(2, 16))


def test_layer_double_module_names_module_dtype():
    m = layer().double()
    with pytest.raises(TypeError, match=r"OmniMoE's parameters are torch.float64; .*\.float\(\)"):
        m(torch.randn(2, 16, dtype=torch.float64))


def test_layer_autocast_mixed_dtypes_allowed():
    m = layer()
    x = torch.randn(2, 5, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.shape == (2, 5, 16) and out.is_floating_point()


def test_layer_one_token_training():
    x = torch.randn(1, 1, 16)
    with pytest.raises(ValueError, match=r"router_norm='batchnorm' needs at least 2 tokens in training mode"):
        layer()(x)
    # Handled where it is well defined: eval mode (running statistics), no norm, 2 tokens,
    # an empty batch.
    assert layer().eval()(x).shape == (1, 1, 16)
    assert layer("none")(x).shape == (1, 1, 16)
    assert layer()(torch.randn(2, 16)).shape == (2, 16)
    assert layer()(torch.randn(0, 16)).shape == (0, 16)


# ------------------------------------------------------------------- tensor layouts
def _sparse_variants(t):
    yield "sparse_coo", t.to_sparse()
    if t.dim() == 2:
        yield "sparse_csr", t.to_sparse_csr()


def _calls():
    """(argument name, function of that argument) for every tensor argument."""
    T, N, H, E, k, I = 4, 3, 8, 9, 2, 6
    x, y = torch.randn(T, N), torch.randn(T, N)
    h, up, down = torch.randn(T, H), torch.randn(E, H), torch.randn(E, H)
    w, idx = torch.rand(T, k), torch.randint(0, E, (T, k))
    g, u = torch.randn(T, I), torch.randn(T, I)
    wg, wu, wd = torch.randn(I, H), torch.randn(I, H), torch.randn(H, I)
    m = layer()
    ex = dict(hidden_states=h, up_weights=up, down_weights=down, routing_weights=w, indices=idx)
    yield "router_logits_x", x, lambda a: omni_router(a, y, N, k)
    yield "router_logits_y", y, lambda a: omni_router(x, a, N, k)
    for name in ex:
        yield name, ex[name], lambda a, name=name: omni_expert(**{**ex, name: a})
    yield "gate", g, lambda a: swiglu(a, u)
    yield "up", u, lambda a: swiglu(g, a)
    mlp = dict(hidden_states=h, gate_weight=wg, up_weight=wu, down_weight=wd)
    for name in mlp:
        yield name, mlp[name], lambda a, name=name: swiglu_mlp(**{**mlp, name: a})
    yield "hidden_states", torch.randn(T, 16), m


@pytest.mark.parametrize("case", range(14))
def test_sparse_layouts_rejected(case):
    name, t, fn = list(_calls())[case]
    fn(t)  # the dense tensor is fine
    for layout, sp in _sparse_variants(t):
        with pytest.raises(TypeError, match=rf"^{name} must be a dense \(strided\) tensor, got layout"):
            fn(sp)


def test_nested_rejected():
    nt = torch.nested.nested_tensor([torch.randn(2, 16), torch.randn(3, 16)])
    with pytest.raises(TypeError, match="hidden_states must be a dense tensor, got a nested tensor"):
        layer()(nt)
    with pytest.raises(TypeError, match="gate must be a dense tensor"):
        swiglu(nt, nt)


def test_meta_tensors_give_shapes():
    """Meta tensors are dense: the PyTorch paths run on them and give output shapes."""
    x = torch.randn(5, 4, device="meta")
    s, i = omni_router(x, x, 4, 3)
    assert s.shape == (5, 3) and i.dtype == torch.int32 and s.device.type == "meta"
    out = omni_expert(torch.randn(5, 8, device="meta"), torch.randn(16, 8, device="meta"),
                      torch.randn(16, 8, device="meta"), torch.rand(5, 3, device="meta"),
                      torch.zeros(5, 3, dtype=torch.int64, device="meta"))
    assert out.shape == (5, 8)
    assert swiglu(x, x).shape == (5, 4)
    assert layer().to("meta")(torch.randn(2, 3, 16, device="meta")).shape == (2, 3, 16)
