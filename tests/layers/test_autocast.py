"""The layer under ``torch.autocast`` with float32 parameters (the mixed-precision recipe of
``Trainer(bf16=True)``, accelerate and AMP loops): forward, backward and optimizer steps
against a float64 evaluation, every router norm, dense and sparse expert gradients, the
Triton kernels (CUDA or the interpreter) and the PyTorch path; fp16 with a GradScaler.

The bound is the one of the bf16 layer tests (``train_and_compare``): on the layer's own
routing, our error against float64 is no worse than the float32 PyTorch formula's under
the same autocast, and the router's scores and running statistics stay within bounds
derived from the rounding of h, W and the logits to the autocast dtype.
"""

from __future__ import annotations

import os

import pytest
import torch

from omni_moe import OmniMoE, OmniMoEConfig
from router_checks import force_expert_schedule
from test_omni_moe_layer import assert_no_worse_than_naive, cfg, train_and_compare
from test_sparse_grad import _Both

pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
              pytest.mark.usefixtures("no_tf32")]

AMP = (torch.bfloat16, torch.float16)


def _config(norm, sparse, **kw):
    c = cfg(norm=norm, **kw)
    c.sparse_expert_grad = sparse
    return c


# The interpreter takes ~45 s per case on 2 cores: three cases there cover each norm, each
# autocast dtype and both gradient layouts; CUDA and the PyTorch path run them all.
INTERPRETED = {("bf16", "batchnorm", "dense"), ("fp16", "layernorm", "sparse"),
               ("bf16", "none", "sparse")}


@pytest.mark.parametrize("amp", AMP, ids=("bf16", "fp16"))
@pytest.mark.parametrize("norm", ("batchnorm", "layernorm", "none"))
@pytest.mark.parametrize("sparse", (False, True), ids=("dense", "sparse"))
def test_three_steps_against_float64(path, amp, norm, sparse):
    names = ({torch.bfloat16: "bf16", torch.float16: "fp16"}[amp], norm, "sparse" if sparse else "dense")
    interpreted = path == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interpreted and names not in INTERPRETED:
        pytest.skip("covered on CUDA and by the PyTorch path; three cases run interpreted")
    make_opt = _Both if sparse else None
    results = train_and_compare(_config(norm, sparse), (4, 64, 32), path, torch.float32,
                                make_optimizer=make_opt, amp=amp)
    assert_no_worse_than_naive(results)


def test_bfloat16_expert_tables(path, monkeypatch):
    """The recipe with the expert tables stored in bfloat16 and every other parameter in
    float32, under bf16 autocast: h (cast to bf16) and the tables then share bfloat16,
    which the expert op's "dense" schedule needs (the launch rule takes it from K >= E/32
    for tables past L2; forced here, the test's tables being small).  Three Adam steps
    against float64, no worse than the float32 formula."""
    from omni_moe.ops.expert import kernels
    force_expert_schedule(monkeypatch, "dense", dense_weight_grads=True)
    calls = []
    dense_forward = kernels.dense_forward
    monkeypatch.setattr(kernels, "dense_forward", lambda *a, **kw: calls.append(1) or dense_forward(*a, **kw))

    def bf16_tables(layer):
        layer.up_embed.to(torch.bfloat16)
        layer.down_embed.to(torch.bfloat16)

    results = train_and_compare(_config("batchnorm", False), (4, 64, 32), path, torch.float32,
                                amp=torch.bfloat16, prepare=bf16_tables)
    assert_no_worse_than_naive(results)
    torch_path = path == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    assert len(calls) == (0 if torch_path else 3)   # the kernels ran "dense" at every step


def test_output_and_gradient_dtypes(path):
    """Output in the autocast dtype, each gradient in its own tensor's dtype, also for a
    bf16 input and a model whose expert tables were left in float32."""
    torch.manual_seed(0)
    layer = OmniMoE(cfg()).to(path)
    layer.gate_proj.bfloat16()   # a half-converted model: legal under autocast
    x = torch.randn(40, 32, device=path, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast(torch.device(path).type, dtype=torch.float16):
        out = layer(x)
    assert out.dtype == torch.float16
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert torch.isfinite(p.grad).all(), name


def test_float32_input_gradient_summed_in_float32(path):
    """A float32 input under bf16 autocast: the router and the output stage each cast it
    (as autocast casts per op), so its gradient is a float32 sum of their terms -- not
    one bf16 tensor cast up, whose every element would be a bf16 value."""
    torch.manual_seed(0)
    layer = OmniMoE(cfg()).to(path)
    x = torch.randn(40, 32, device=path, requires_grad=True)
    with torch.autocast(torch.device(path).type, dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert (x.grad.bfloat16().float() != x.grad).any()


def test_float64_input_rejected_under_autocast(path):
    layer = OmniMoE(cfg()).to(path)
    with torch.autocast(torch.device(path).type, dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="hidden_states has dtype torch.float64"):
            layer(torch.randn(4, 32, device=path, dtype=torch.float64))


@pytest.mark.parametrize("sparse", (False, True), ids=("dense", "sparse"))
def test_fp16_grad_scaler_skips_overflow(path, sparse):
    """fp16 autocast with ``torch.amp.GradScaler``: a scale that overflows the fp16
    backward gives inf/NaN gradients, the scaler skips that step (weights unchanged,
    nothing NaN) and lowers the scale; later steps train."""
    if sparse and path == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the interpreter runs the dense case (the PyTorch path and CUDA run both)")
    dev = torch.device(path).type
    torch.manual_seed(0)
    layer = OmniMoE(_config("batchnorm", sparse)).to(path)
    opts = _Both(layer, lr=1e-2).opts if sparse else [torch.optim.Adam(layer.parameters(), lr=1e-2)]
    # 2^32 overflows fp16 in the first backward; each overflow divides the scale by 256.
    scaler = torch.amp.GradScaler(dev, init_scale=2.0**32, backoff_factor=2.0**-8,
                                  growth_interval=1000)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=gen).to(path)
    target = torch.randn(64, 32, generator=gen).to(path)

    def step():
        with torch.autocast(dev, dtype=torch.float16):
            loss = (layer(x).float() - target).square().mean()
        scaler.scale(loss).backward()
        for opt in opts:
            scaler.step(opt)
            opt.zero_grad()
        scaler.update()
        return loss.item()

    step()
    assert scaler.get_scale() < 2.0**32, "the overflowing step was not detected"
    for n, p in layer.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} changed on a skipped step"
    losses = [step() for _ in range(10)]
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    assert any(not torch.equal(p.detach(), before[n]) for n, p in layer.named_parameters())
    assert losses[-1] < losses[0], losses
