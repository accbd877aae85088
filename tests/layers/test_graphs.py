"""A whole training step (forward, backward, optimizer step) of the OmniMoE layer under
torch.compile(fullgraph=True) and in a CUDA graph.

CPU: the compiled step (backends eager / aot_eager, no graph break, no recompilation
over steps) equals the eager step.  GPU (``-m gpu``): the step captured with
``torch.cuda.graph`` and replayed equals the eager step; ``torch.compile(mode=
"reduce-overhead", fullgraph=True)`` runs it through CUDA graphs; the eager step makes
no device->host sync (``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import HAS_CUDA
from omni_moe import OmniMoE, OmniMoEConfig
from router_checks import force_expert_schedule

pytestmark = pytest.mark.usefixtures("no_tf32")


def _cfg(H=32, I=48, E=64, k=4, norm="batchnorm", act="silu"):
    return OmniMoEConfig(hidden_size=H, intermediate_size=I, hidden_act=act, num_experts=E,
                         num_experts_per_token=k, router_norm=norm)


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


def _loss(out, target):
    return (out.float() - target.float()).square().mean()


# --------------------------------------------------------------------------- CPU: compile

@pytest.mark.parametrize("backend,norm,amp", [
    ("eager", "batchnorm", None), ("aot_eager", "batchnorm", None), ("aot_eager", "none", None),
    ("aot_eager", "batchnorm", torch.bfloat16), ("aot_eager", "layernorm", torch.bfloat16)])
def test_compiled_training_steps_cpu(backend, norm, amp):
    """Three SGD steps of the compiled layer (fullgraph, recompilation an error) against
    the eager twin: outputs, every gradient, BatchNorm statistics and the weights; also
    float32 weights under ``torch.autocast`` (``amp``)."""
    torch._dynamo.reset()
    torch.manual_seed(7)
    layer = OmniMoE(_cfg(norm=norm))
    twin = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (layer, twin)]
    gen = torch.Generator().manual_seed(8)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            x = torch.randn(2, 12, 32, generator=gen)
            target = torch.randn(2, 12, 32, generator=gen)
            outs = []
            for fn, opt in ((compiled, opts[0]), (twin, opts[1])):
                with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                    out = fn(x)
                assert out.dtype == (amp or torch.float32)
                _loss(out, target).backward()
                outs.append(out.detach())
            if amp is None:
                torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
            else:
                # bf16 GEMMs and roundings on both sides, in different fusions (inductor's
                # prologue vs the fused stages): equal to bf16 rounding, not bitwise.
                assert _rel(outs[0], outs[1]) <= 1e-2, _rel(outs[0], outs[1])
            for (n, p), (_, q) in zip(layer.named_parameters(), twin.named_parameters()):
                if amp is None:
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
                else:
                    assert p.grad.dtype == p.dtype and _rel(p.grad, q.grad) <= 2e-2, (n, _rel(p.grad, q.grad))
            for opt in opts:
                opt.step()
                opt.zero_grad()
            tol = dict(rtol=1e-5, atol=1e-6) if amp is None else dict(rtol=1e-3, atol=1e-3)
            for (n, p), (_, q) in zip(layer.named_parameters(), twin.named_parameters()):
                torch.testing.assert_close(p, q, **tol, msg=n)
            for (n, b), (_, c) in zip(layer.named_buffers(), twin.named_buffers()):
                torch.testing.assert_close(b, c, **(tol if b.is_floating_point() else {}), msg=n)
    if norm == "batchnorm":
        assert int(layer.router_norm_x.num_batches_tracked) == 3


# --------------------------------------------------------------------------- GPU

def _gpu_layer(E, seed=0):
    torch.manual_seed(seed)
    return OmniMoE(_cfg(H=128, I=256, E=E, k=8)).cuda()


@pytest.fixture
def expert_mode(request, monkeypatch):
    schedule = getattr(request, "param", None)
    if schedule is not None:
        force_expert_schedule(monkeypatch, schedule)
    yield schedule


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("expert_mode", ["token", "expert"], indirect=True)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, "amp"),
                         ids=["fp32", "bf16", "fp32-autocast-bf16"])
def test_cuda_graph_training_step(expert_mode, dtype):
    """forward + loss + backward + Adam(capturable) step captured once, replayed on fresh
    data: the weights, gradients, BatchNorm statistics and outputs equal the eager
    twin's after every step (the same kernels run in both).  "amp": float32 weights, the
    forward under torch.autocast(bf16)."""
    T, H, E = 512, 128, 4096
    amp = dtype == "amp"
    dtype = torch.float32 if amp else dtype
    layer = _gpu_layer(E).to(dtype)
    twin = copy.deepcopy(layer)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3, capturable=True)
    opt_twin = torch.optim.Adam(twin.parameters(), lr=1e-3, capturable=True)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(T, H, generator=gen).to(dtype).cuda(),
             torch.randn(T, H, generator=gen).to(dtype).cuda()) for _ in range(7)]
    static_x = data[0][0].clone()
    static_t = data[0][1].clone()

    def step(model, optimizer, x, t):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        _loss(out, t).backward()
        optimizer.step()
        return out

    # Warm-up on a side stream (kernels compiled, optimizer state allocated), 3 steps.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            static_x.copy_(data[i][0])
            static_t.copy_(data[i][1])
            opt.zero_grad(set_to_none=True)
            step(layer, opt, static_x, static_t)
    torch.cuda.current_stream().wait_stream(s)
    for i in range(3):
        opt_twin.zero_grad(set_to_none=True)
        step(twin, opt_twin, data[i][0], data[i][1])

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_out = step(layer, opt, static_x, static_t)

    for i in range(3, 7):
        static_x.copy_(data[i][0])
        static_t.copy_(data[i][1])
        graph.replay()
        opt_twin.zero_grad(set_to_none=True)
        ref = step(twin, opt_twin, data[i][0], data[i][1])
        torch.cuda.synchronize()
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 and not amp else dict(rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(static_out, ref, **tol, msg=f"step {i}")
        for (n, p), (_, q) in zip(layer.named_parameters(), twin.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, **tol, msg=f"step {i} grad {n}")
            torch.testing.assert_close(p, q, **tol, msg=f"step {i} {n}")
        for (n, b), (_, c) in zip(layer.named_buffers(), twin.named_buffers()):
            torch.testing.assert_close(b, c, msg=f"step {i} {n}")
    assert int(layer.router_norm_x.num_batches_tracked) == 7


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("compile_optimizer,amp", [(False, False), (True, False), (False, True)],
                         ids=["eager_opt", "compiled_opt", "eager_opt-autocast-bf16"])
def test_compile_reduce_overhead_training_steps(compile_optimizer, amp):
    """torch.compile(mode="reduce-overhead", fullgraph=True): five Adam steps against the
    eager layer (inductor computes the router's BatchNorm and log_softmax itself, so
    near-tied routing choices may differ: at least 99% of the tokens must route the
    same, their outputs agree to float32 rounding, and the weights stay within 1e-3),
    and the compiled forward and backward ran as CUDA graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    T, H = 512, 128
    layer = _gpu_layer(4096, seed=3)
    twin = copy.deepcopy(layer)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3, capturable=compile_optimizer)
    opt_twin = torch.optim.Adam(twin.parameters(), lr=1e-3, capturable=compile_optimizer)
    opt_step = torch.compile(opt.step, fullgraph=False) if compile_optimizer else opt.step
    gen = torch.Generator().manual_seed(4)
    for i in range(5):
        x = torch.randn(T, H, generator=gen).cuda()
        t = torch.randn(T, H, generator=gen).cuda()
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out, (_, idx) = compiled(x, return_routing=True)
        out, idx = out.clone(), idx.clone()        # graph outputs are reused by the next replay
        _loss(out, t).backward()
        opt_step()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            ref, (_, ref_idx) = twin(x, return_routing=True)
        _loss(ref, t).backward()
        opt_twin.step()
        opt_twin.zero_grad(set_to_none=True)
        same = (idx == ref_idx).all(dim=1)
        assert same.float().mean().item() >= 0.99, f"step {i}: routing differs on too many tokens"
        tol = dict(rtol=2e-2, atol=2e-2) if amp else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[same], ref[same], **tol)
    for (n, p), (_, q) in zip(layer.named_parameters(), twin.named_parameters()):
        assert _rel(p, q) <= 1e-3, n
    skips = counters["inductor"].get("cudagraph_skips", 0)
    assert skips == 0, f"inductor skipped CUDA graphs {skips} times: {dict(counters['inductor'])}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("expert_mode", ["token", "expert"], indirect=True)
def test_eager_training_step_has_no_host_sync(expert_mode):
    """An eager step (forward, backward, SGD step) issues no device->host sync."""
    layer = _gpu_layer(4096, seed=5)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2, momentum=0.9)
    x = torch.randn(256, 128, device="cuda")
    for i in range(2):  # the first step compiles kernels and fills caches (may sync)
        if i == 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
