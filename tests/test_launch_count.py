"""omni_moe.bench.launch_count: exact launch and autograd-node counts of one eager step.

The layer's counts are pinned: a change that adds a launch or an autograd node to the
training step fails here and has to update the numbers (and docs/layer.md) on purpose.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import triton
import triton.language as tl

from conftest import HAS_CUDA
from omni_moe import OmniMoE, OmniMoEConfig
from omni_moe.bench.launch_count import autograd_nodes, count_cuda_kernels, count_triton_launches, step_counts


@triton.jit
def _twice_kernel(X, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(X + offs, tl.load(X + offs, mask=m) * 2.0, mask=m)


def test_counts_triton_launches(device):
    x = torch.ones(100, device=device)
    with count_triton_launches() as c:
        for _ in range(3):
            _twice_kernel[(4,)](x, 100, BLOCK=32)
    assert c == Counter({"_twice_kernel": 3})
    assert torch.equal(x, torch.full_like(x, 8.0))        # the launches really ran
    with count_triton_launches() as c2:
        pass
    assert c2 == Counter()
    _twice_kernel[(4,)](x, 100, BLOCK=32)                  # not counted after the block
    assert c == Counter({"_twice_kernel": 3})


def test_autograd_nodes():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    y = (a * b + a).sum()
    nodes = autograd_nodes(y)
    assert nodes == Counter({"SumBackward0": 1, "AddBackward0": 1, "MulBackward0": 1,
                             "AccumulateGrad": 2})
    assert autograd_nodes(torch.ones(2)) == Counter()


def _layer(norm):
    torch.manual_seed(0)
    return OmniMoE(OmniMoEConfig(32, 48, num_experts=64, num_experts_per_token=4, router_norm=norm))


@pytest.mark.parametrize("norm", ("batchnorm", "none"))
def test_layer_step_counts(device, norm):
    """One eager training step of the layer on the kernels ("token" schedule)."""
    layer = _layer(norm).to(device)
    x = torch.randn(24, 32, device=device, requires_grad=True)
    r = step_counts(layer, x)
    prologue_fwd = (["_stats_partial_kernel", "_stats_finalize_kernel"] if norm == "batchnorm" else [])
    prologue_bwd = (["_sums_finalize_kernel", "_bn_backward_kernel"] if norm == "batchnorm" else [])
    assert r["triton_forward"] == Counter(prologue_fwd + [
        "_rows_forward_kernel", "_pruned_router_fwd_kernel", "_token_forward_kernel",
        "_swiglu_fwd_kernel"])
    assert r["triton_backward"] == Counter(prologue_bwd + [
        "_rows_backward_kernel", "_router_bwd_kernel", "_token_backward_kernel",
        "_expert_grad_kernel", "_swiglu_bwd_kernel"])
    assert r["triton_launches"] == (13 if norm == "batchnorm" else 9)
    # 8 leaves: the input and 7 weights; the loss adds Pow + Sum to the layer's nodes.
    assert r["accumulate_grad"] == 8
    assert r["autograd_nodes"] == LAYER_NODES + 2, dict(r["nodes_by_type"])
    assert x.grad is not None and layer.up_embed.weight.grad is not None


# Autograd nodes of one layer forward on (T, H) input (without the loss's two): the
# router stage and the output stage (experts + shared MLP).
LAYER_NODES = 2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="the profiler's CUDA activity needs CUDA")
def test_cuda_kernel_counts():
    layer = _layer("batchnorm").cuda()
    x = torch.randn(256, 32, device="cuda", requires_grad=True)
    step_counts(layer, x)                                  # compile the kernels first
    r = step_counts(layer, x, profile_cuda=True)
    cuda = r["cuda"]
    assert cuda["kernels"] >= r["triton_launches"]
    assert cuda["launch_calls"] >= r["triton_launches"]
    names = " ".join(cuda["by_kernel"])
    for k in ("_token_forward_kernel", "_expert_grad_kernel", "_pruned_router_fwd_kernel"):
        assert k in names
    _, stats = count_cuda_kernels(lambda: torch.ones(3, device="cuda") * 2)
    assert stats["kernels"] >= 1
