"""NaN and infinite upstream gradients in the expert backward and the layer.

Defined behaviour: the gradients are what the formulas give in IEEE arithmetic -- a
NaN or infinite element of grad_out reaches every gradient that sums a product with it
(NaN where the float64 oracle is NaN, the same infinities where it is infinite), every
other element stays finite and within its usual bound, and nothing raises.  The special
values are built from bit patterns (quiet and signalling NaN of both signs, +-inf), not
by converting a float32 NaN, so every payload of the gradient's dtype is exercised.
"""

from __future__ import annotations

import pytest
import torch

from router_checks import force_expert_schedule

from _expert_oracle import expert_oracle
from _tolerance import accumulation_bound, assert_close_ulps

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# name -> bits per dtype
PATTERNS = {
    "+qnan": {F32: 0x7FC00000, F16: 0x7E00, BF16: 0x7FC0},
    "-qnan": {F32: -0x00400000, F16: -0x0200, BF16: -0x0040},   # 0xFFC00000, 0xFE00, 0xFFC0
    "+snan": {F32: 0x7F800001, F16: 0x7C01, BF16: 0x7F81},
    "-snan": {F32: -0x007FFFFF, F16: -0x03FF, BF16: -0x007F},   # 0xFF800001, 0xFC01, 0xFF81
    "+inf": {F32: 0x7F800000, F16: 0x7C00, BF16: 0x7F80},
    "-inf": {F32: -0x00800000, F16: -0x0400, BF16: -0x0080},    # 0xFF800000, 0xFC00, 0xFF80
}
_INT = {F32: torch.int32, F16: torch.int16, BF16: torch.int16}


def special(name, dtype):
    """A 0-d tensor of `dtype` holding the bit pattern `name`."""
    v = torch.tensor(PATTERNS[name][dtype], dtype=_INT[dtype]).view(dtype)
    want_nan = "nan" in name
    assert bool(torch.isnan(v)) == want_nan and (want_nan or bool(torch.isinf(v)))
    return v


@pytest.mark.parametrize("mode", ["token", "expert"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_expert_backward_nonfinite_upstream(dtype, mode, device, monkeypatch):
    from omni_moe import omni_expert

    T, H, E, k = 6, 16, 7, 3
    g = torch.Generator().manual_seed(17)
    h = torch.randn(T, H, generator=g)
    up = torch.randn(E, H, generator=g) / H ** 0.5
    down = torch.randn(E, H, generator=g)
    w = torch.rand(T, k, generator=g) + 0.1
    idx = torch.randint(0, E, (T, k), generator=g)
    go = torch.randn(T, H, generator=g).to(dtype)
    # one special element in each of tokens 0..5 (token 5 keeps two of them)
    names = list(PATTERNS)
    for t, name in enumerate(names):
        go[t, (3 * t) % H] = special(name, dtype)
    go[T - 1, 1] = special("+qnan", dtype)
    tensors = [x.to(dtype).to(device) for x in (h, up, down, w)]
    leaves = [x.clone().requires_grad_() for x in tensors]
    force_expert_schedule(monkeypatch, mode)
    out = omni_expert(*leaves, idx.to(device), "gelu")
    out.backward(go.to(device))
    got = [out.detach()] + [x.grad for x in leaves]
    want, mag, n_ops = expert_oracle(*tensors, idx, go, "gelu")
    for name, a, o, m in zip(("out", "d_hidden", "d_up", "d_down", "d_routing"), got, want, mag):
        assert a is not None, name
        # the non-finite pattern must match exactly; finite elements keep their bound
        assert_close_ulps(a, o, 0.5, a.dtype, 2 * accumulation_bound(n_ops, torch.nan_to_num(m, posinf=0.0)), name)
    # the gradients the special values reach really are non-finite (the test has teeth)
    assert bool((~torch.isfinite(got[1].cpu())).all(dim=1).all())


@pytest.mark.parametrize("pattern", ["+qnan", "-snan", "-inf"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_layer_nonfinite_upstream(dtype, pattern, device, no_tf32):
    from omni_moe import OmniMoE, OmniMoEConfig
    from omni_moe.layers.reference import OmniMoEReference

    config = OmniMoEConfig(hidden_size=16, intermediate_size=24, hidden_act="silu",
                           num_experts=36, num_experts_per_token=3, router_norm="batchnorm")
    torch.manual_seed(23)
    layer = OmniMoE(config).to(device).to(dtype)
    oracle = OmniMoEReference.from_module(layer, torch.float64)
    gen = torch.Generator().manual_seed(24)
    T = 10
    x = torch.randn(T, 16, generator=gen).to(dtype).to(device).requires_grad_()
    gout = torch.randn(T, 16, generator=gen).to(dtype)
    gout[2, 5] = special(pattern, dtype)
    gout = gout.to(device)
    out, (_, idx) = layer(x, return_routing=True)
    out.backward(gout)
    xd = x.detach().double().requires_grad_()
    ref = oracle(xd, indices=idx)
    ref.backward(gout.double())
    pairs = [("d_input", x.grad, xd.grad)]
    oparams = dict(oracle.named_parameters())
    for name, p in layer.named_parameters():
        pairs.append(("d_" + name, p.grad, oparams[name].grad))
    for name, a, o in pairs:
        assert a is not None and a.shape == o.shape, name
        a, o = a.detach().cpu(), o.detach().cpu()
        assert torch.equal(torch.isnan(a), torch.isnan(o)), f"{name}: NaN positions differ from the oracle"
        inf = torch.isinf(o)
        assert torch.equal(torch.isinf(a), inf) and torch.equal(a[inf].double(), o[inf]), \
            f"{name}: infinities differ from the oracle"
    # the special value reached the input gradient (batch statistics spread it to every token)
    assert not bool(torch.isfinite(x.grad).all())
