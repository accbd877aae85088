"""The bf16 layer routes like the float64 layer formula except on near ties.

Rounding the router logits to bf16 (the gate GEMM's output dtype) moves every score by
up to ``bf16_router_bounds``; where two experts' float64 scores are closer than that, the
bf16 layer may choose the other one, and one such flip changes that token's gradients by
O(1) (docs/testing.md, "bf16 layer against float64").  This test holds every difference
to that: per token, no expert the layer left out may beat one it chose by more than the
two experts' bounds, in float64.  Kernels (CUDA or the interpreter) and the PyTorch path.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import HAS_CUDA, script_module
from omni_moe import OmniMoE, OmniMoEConfig
from omni_moe.layers.reference import OmniMoEReference
from omni_moe.ops._dispatch import use_triton
from test_omni_moe_layer import bf16_router_bounds


def float64_scores(oracle, xd):
    """(T, N*N) float64 log p_x(i) + log p_y(j) of the float64 formula (training-mode
    statistics; the oracle is a throwaway copy, its running statistics may move)."""
    with torch.no_grad():
        px = torch.log_softmax(oracle.router_norm_x(oracle.router_gate_x(xd)), -1)
        py = torch.log_softmax(oracle.router_norm_y(oracle.router_gate_y(xd)), -1)
    T, N = px.shape
    return (px[:, :, None] + py[:, None, :]).reshape(T, N * N)


def test_bf16_routing_differs_only_on_near_ties(path):
    """Three training passes of the case of docs/testing.md.  With these seeds some
    tokens do route differently from the float64 formula on the CPU (checked, so that the
    bound is exercised); on CUDA the count may differ."""
    T, H, I, E, k = 32, 64, 128, 144, 6
    config = OmniMoEConfig(H, I, "silu", E, k, router_norm="batchnorm")
    torch.manual_seed(5)
    layer = OmniMoE(config)
    torch.nn.init.normal_(layer.down_embed.weight, std=1.0)
    layer = layer.to(device=path, dtype=torch.bfloat16)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(6)
    every = torch.arange(E).expand(T, E)
    flipped = 0
    for step in range(3):
        x = torch.randn(T, H, generator=gen).bfloat16().to(path)
        oracle = OmniMoEReference.from_module(layer, torch.float64).cpu()
        out, (_, idx) = layer(x, return_routing=True)
        out.float().square().mean().backward()
        xd = x.double().cpu()
        S = float64_scores(copy.deepcopy(oracle), xd)
        B = bf16_router_bounds(oracle, xd, every, config)["scores"]
        chosen = torch.zeros(T, E, dtype=torch.bool).scatter_(1, idx.long().cpu(), True)
        weakest = torch.where(chosen, S + B, torch.inf).min(1).values
        strongest_left_out = torch.where(chosen, -torch.inf, S - B).max(1).values
        worst = int((strongest_left_out - weakest).argmax())
        assert bool((strongest_left_out <= weakest).all()), (
            f"step {step} token {worst}: an expert left out beats a chosen one by "
            f"{float(strongest_left_out[worst] - weakest[worst]):.3g} beyond the bf16 bounds")
        top = torch.zeros_like(chosen).scatter_(1, S.topk(k, 1).indices, True)
        flipped += int((top != chosen).any(1).sum())
        opt.step()
        opt.zero_grad()
    assert flipped > 0 or HAS_CUDA, "no token flipped: the bound above was not exercised"


@pytest.fixture
def bench():
    yield from script_module("benchmarks/bf16_layer_error.py", "bench_bf16_layer_error")


def test_bf16_benchmark_decomposition(path, bench, capsys):
    """benchmarks/bf16_layer_error.py on one seed, kernels (interpreter) and PyTorch path:
    on the layer's own routing ours beats the naive bf16 formula; with float32 router
    logits nothing flips and ours is as close as the once-rounded float64 gradient; a
    bf16 round trip of the routing weights costs something; bad arguments exit 2 with
    one line."""
    if path != "cpu":
        pytest.skip("the benchmark runs on the CPU")
    kernels = use_triton(torch.empty(0))
    rows = {v: bench.run(0, v, "up_embed.weight", "batchnorm") for v in bench.VARIANTS
            if not (kernels and v in bench.TORCH_ONLY)}
    assert rows["as-is"]["ours/same"] < 0.5 * rows["as-is"]["naive/same"]
    f32 = rows["f32-logits"]
    assert f32["flips"] == 0 and f32["ours/free"] == f32["ours/same"]
    assert f32["ours/same"] <= 1.1 * f32["floor"]
    if not kernels:
        assert rows["bf16-weights"]["ours/same"] > rows["as-is"]["ours/same"]
    for argv in (["--seeds", "0"], ["--param", "nope"]):
        assert bench.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("bf16_layer_error.py: ")
