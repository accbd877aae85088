"""The CPU (PyTorch) paths accumulate in float32 and round once, as the kernels do.

For bf16 inputs each output is compared with the float64 value of the same formula on the
same (bf16) inputs, S.  A float32 evaluation of a chain of at most K roundings in float32
(dot products, sums over pairs, the activation) is off by at most about K * 2^-24 * A,
where A is the same formula on absolute values (no cancellation); rounding that once to
bf16 adds half a bf16 ulp.  So every element must satisfy

    |ours - S| <= 0.5 * ulp_bf16(|S| + e) + e,    e = K * 2^-24 * A

(K counts the terms of the longest chain plus a margin for the activation and products).
Accumulating in bf16 instead costs up to 2^-9 * A per addition, far above this bound once
a sum has more than a couple of terms, so the test fails for such code.
"""

from __future__ import annotations

import pytest
import torch

from omni_moe import omni_expert, omni_router, swiglu
from omni_moe.ops.expert.reference import expert_naive

U32 = 2.0**-24


pytestmark = pytest.mark.usefixtures("torch_path")


def ulp_bf16(v: torch.Tensor) -> torch.Tensor:
    """bf16 unit in the last place at |v| (float64), subnormal range included."""
    e = torch.frexp(v.abs().clamp_min(2.0**-126))[1]
    return torch.ldexp(torch.ones_like(v), e - 8)


def assert_within_bound(name, ours, S, A, K):
    S, A = S.double(), A.double()
    e = K * U32 * A
    bound = 0.5 * ulp_bf16(S.abs() + e) + e
    err = (ours.detach().double() - S).abs()
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"{name}: error {worst:.3g} x the float32-accumulation bound"


def test_expert_cpu_bf16_within_bound():
    torch.manual_seed(0)
    T, H, E, k = 256, 64, 8, 4        # ~128 pairs per expert: long sums in dup / ddown
    h = torch.randn(T, H).bfloat16()
    up = (torch.randn(E, H) / 8).bfloat16()
    down = (torch.randn(E, H) / 8).bfloat16()
    w = torch.rand(T, k).bfloat16()
    idx = torch.randint(0, E, (T, k))
    go = torch.randn(T, H).bfloat16()
    leaves = [t.clone().requires_grad_() for t in (h, up, down, w)]
    out = omni_expert(*leaves, idx, act="silu")
    out.backward(go)
    ref_leaves = [t.double().requires_grad_() for t in (h, up, down, w)]
    ref = expert_naive(*ref_leaves, idx, act="silu")
    ref.backward(go.double())

    # Absolute-value versions (|silu(a)| <= |a|, |silu'(a)| <= 1.1).
    i = idx.long()
    hA, uA, vA, wA, gA = (t.double().abs() for t in (h, up, down, w, go))
    aA = torch.einsum("tkh,th->tk", uA[i], hA)
    gdotA = torch.einsum("tkh,th->tk", vA[i], gA)
    daA = 1.1 * wA * gdotA
    outA = torch.einsum("tk,tkh->th", aA * wA, vA[i])
    dhA = torch.einsum("tk,tkh->th", daA, uA[i])
    dupA = torch.zeros(E, H, dtype=torch.float64).index_add_(
        0, i.reshape(-1), (daA[..., None] * hA[:, None, :]).reshape(-1, H))
    ddownA = torch.zeros(E, H, dtype=torch.float64).index_add_(
        0, i.reshape(-1), ((aA * wA)[..., None] * gA[:, None, :]).reshape(-1, H))
    dwA = aA * gdotA
    # Chains: a dot product over H, then a sum over the k slots of a token (out, dh) or
    # over the pairs of an expert (dup, ddown).
    pairs = int(torch.bincount(i.reshape(-1), minlength=E).max())
    assert_within_bound("out", out, ref, outA, H + k + 16)
    assert_within_bound("d hidden_states", leaves[0].grad, ref_leaves[0].grad, dhA, H + k + 16)
    assert_within_bound("d up_weights", leaves[1].grad, ref_leaves[1].grad, dupA, H + pairs + 16)
    assert_within_bound("d down_weights", leaves[2].grad, ref_leaves[2].grad, ddownA, H + pairs + 16)
    assert_within_bound("d routing_weights", leaves[3].grad, ref_leaves[3].grad, dwA, H + 16)


def test_router_backward_cpu_bf16_within_bound():
    torch.manual_seed(1)
    T, N, k = 64, 8, 64               # each logit collects k / N = 8 gradients
    x = torch.randn(T, N).bfloat16().requires_grad_()
    y = torch.randn(T, N).bfloat16().requires_grad_()
    s, idx = omni_router(x, y, N, k)
    g = torch.randn(T, k).bfloat16()
    s.backward(g)
    i = idx.long()
    z = torch.zeros(T, N, dtype=torch.float64)
    for grad, col in ((x.grad, i // N), (y.grad, i % N)):
        S = z.clone().scatter_add_(1, col, g.double())
        A = z.clone().scatter_add_(1, col, g.double().abs())
        assert_within_bound("router d logits", grad, S, A, k + 4)


@pytest.mark.parametrize("act", ("silu", "gelu", "relu"))
def test_swiglu_cpu_bf16_within_bound(act):
    torch.manual_seed(2)
    gate = (torch.randn(64, 96) * 3).bfloat16().requires_grad_()
    up = torch.randn(64, 96).bfloat16().requires_grad_()
    d = torch.randn(64, 96).bfloat16()
    out = swiglu(gate, up, act)
    out.backward(d)
    g64 = gate.detach().double().requires_grad_()
    u64 = up.detach().double().requires_grad_()
    f = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
         "relu": torch.nn.functional.relu}[act]
    ref = f(g64) * u64
    ref.backward(d.double())
    # Elementwise: |act(g)| <= |g| and |act'(g)| <= 1.13 for all three.
    gA, uA, dA = g64.detach().abs(), u64.detach().abs(), d.double().abs()
    assert_within_bound("swiglu", out, ref, gA * uA, 16)
    assert_within_bound("swiglu d gate", gate.grad, g64.grad, 1.13 * dA * uA, 16)
    assert_within_bound("swiglu d up", up.grad, u64.grad, dA * gA, 16)
