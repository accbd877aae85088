#!/usr/bin/env python
"""Where one OmniMoE training step spends its time: host issue time per stage, GPU time
per kernel family, and the host's cost per call on this machine.

Run on a CUDA machine from the repository root:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/profile_layer.py [--cases 0,1] [--json PATH]

Per case (T, H, I, E, k), bf16, silu, BatchNorm router norm, training mode:
  - host ms of each stage of one eager forward + backward, the GPU drained before each
    (clock stopped when the call returns, so it is the CPU time of issuing the work):
    router stage forward, output stage forward, the backward of both, and the dense
    MLP's forward + backward for scale; medians over ``--reps`` steps;
  - GPU µs per kernel family and per kernel name of one step (torch.profiler device
    events), with the number of launches of each, and the largest host operations;
  - with ``--sparse``, the same for the whole SGD training step with dense and with
    sparse expert gradients.
Once per run, the host cost of single calls (empty Triton launches with 1, 8 and 24
arguments, ``torch.empty``, an aten elementwise op, a small cuBLAS GEMM, a no-op
``autograd.Function`` forward and backward) and the omni router's eager forward at
T = 1024 (``do_bench`` medians of five separate measurements, and the host time per call
over back-to-back calls), whose spread is the host's.
Writes ``--json`` (default $OUT/profile_layer.json) with the GPU name and versions.
``--dry`` runs the host part at tiny sizes on CPU (TRITON_INTERPRET=1) to test the script.

``--router T,N,k`` only runs the omni router's forward five times at that size (bf16), for
a kernel profiler to attach to, e.g.

    ncu --clock-control none -k regex:_pruned_router -s 2 -c 1 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats \
        python benchmarks/profile_layer.py --router 16384,256,32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

CASES = [(4096, 1024, 4096, 4096, 16), (8192, 1024, 4096, 65536, 32), (4096, 2048, 8192, 1048576, 16)]
DRY_CASES = [(48, 32, 48, 64, 4)]

# Kernel families by name fragment, first match wins (Triton kernels keep their Python names).
FAMILIES = [
    ("router", ("_pruned_router", "_router_bwd", "_fullscan", "_topk")),
    ("router norm", ("_stats_", "_rows_", "_sums_finalize", "_bn_backward")),
    ("experts", ("_token_", "_pair_dot", "_gather_combine", "_expert_grad")),
    ("swiglu", ("_swiglu",)),
    ("sort / scan", ("sort", "radix", "scan", "cub", "histogram", "bincount")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90", "sm100")),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, frags in FAMILIES:
        if any(f.lower() in low for f in frags):
            return fam
    return "other"


def stage_host_ms(layer, mlp, x, reps, sync):
    """Host ms per stage (see the module docstring)."""
    from omni_moe.bench.common import host_ms
    from omni_moe.layers.output_stage import output_stage

    def route():
        return layer.route(x)

    def fwd_out(si):
        return output_stage(layer, x, *si)

    res = {}
    res["router_forward"] = host_ms(route, samples=reps)
    si = route()
    res["output_forward"] = host_ms(lambda: fwd_out(si), samples=reps)

    def backward():
        scores, idx = layer.route(x)
        out = fwd_out((scores, idx))
        loss = out.float().square().mean()
        sync()
        t0 = time.perf_counter()
        loss.backward()
        return (time.perf_counter() - t0) * 1e3

    ts = []
    for _ in range(reps):
        layer.zero_grad(set_to_none=True)
        ts.append(backward())
    sync()
    res["backward"] = statistics.median(ts)

    def step(m):
        m.zero_grad(set_to_none=True)
        m(x).float().square().mean().backward()

    res["layer_step"] = host_ms(lambda: step(layer), samples=reps)
    res["mlp_step"] = host_ms(lambda: step(mlp), samples=reps)
    return res


def gpu_breakdown(layer, x, opt=None):
    """({family: [µs, launches]}, {kernel name: [µs, launches]}, [host ops]) of one
    training step (grads set to None, fwd + bwd, and ``opt.step()`` if given); host ops:
    the 15 largest aten/autograd operations by self CPU time under the profiler (which
    slows the host down, so read them as shares)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def step():
        layer.zero_grad(set_to_none=True)
        layer(x).float().square().mean().backward()
        if opt is not None:
            opt.step()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    host = sorted(((e.key, e.count, e.self_cpu_time_total) for e in prof.key_averages()
                   if e.self_cpu_time_total > 0), key=lambda r: -r[2])[:15]
    fams, names = defaultdict(lambda: [0.0, 0]), defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        # Ranges such as "Optimizer.step#SGD.step" also appear on the GPU timeline; they
        # span kernels already counted.
        if e.device_type != torch.autograd.DeviceType.CUDA or "#" in e.name:
            continue
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        fam = "memset / memcpy" if ("memset" in e.name.lower() or "memcpy" in e.name.lower()) \
            else family(e.name)
        for d, key in ((fams, fam), (names, e.name[:90])):
            d[key][0] += us
            d[key][1] += 1
    return (dict(fams), dict(sorted(names.items(), key=lambda kv: -kv[1][0])),
            [list(r) for r in host])


def call_costs(dev, reps):
    """Host µs of single calls (medians of ``reps`` back-to-back blocks of 50)."""
    import torch
    import triton

    @triton.jit
    def _empty1(a):
        pass

    @triton.jit
    def _empty8(a, b, c, d, e, f, g, h):
        pass

    @triton.jit
    def _empty24(a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q, r, s, t, u, v, w, x):
        pass

    buf = torch.zeros(16, device=dev)
    w = torch.randn(256, 256, device=dev)

    class Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a.view_as(a)

        @staticmethod
        def backward(ctx, g):
            return g

    leaf = torch.zeros(16, device=dev, requires_grad=True)
    calls = {
        "triton launch, 1 argument": lambda: _empty1[(1,)](buf),
        "triton launch, 8 arguments": lambda: _empty8[(1,)](buf, 1, 2, 3, 4, 5, 6, 7),
        "triton launch, 24 arguments": lambda: _empty24[(1,)](buf, *range(1, 24)),
        "torch.empty(16)": lambda: torch.empty(16, device=dev),
        "x.add_(1) (aten elementwise)": lambda: buf.add_(1),
        "F.linear 256x256 (cuBLAS)": lambda: torch.nn.functional.linear(w, w),
        "autograd.Function.apply (no kernel)": lambda: Noop.apply(leaf),
        "torch.autograd.grad through a no-op Function": lambda: torch.autograd.grad(Noop.apply(leaf).sum(), leaf),
    }
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    out = {}
    for name, fn in calls.items():
        for _ in range(3):
            fn()
        sync()
        blocks = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(50):
                fn()
            blocks.append((time.perf_counter() - t0) * 1e6 / 50)
            sync()
        out[name] = statistics.median(blocks)
    return out


def router_t1024(dev, dtype):
    """Eager router forward at T = 1024: five do_bench medians and host µs per call."""
    import torch
    from triton.testing import do_bench

    from omni_moe import omni_router

    res = {}
    for N in (64, 256):
        x = torch.randn(1024, N, device=dev, dtype=dtype)
        y = torch.randn(1024, N, device=dev, dtype=dtype)
        fn = lambda: omni_router(x, y, N, 16)  # noqa: E731
        fn()
        medians = [do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3 for _ in range(5)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(1000):
            fn()
        host = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        res[f"N={N}"] = {"do_bench_us": medians, "host_us_per_call": host}
    return res


def router_only(T, N, k):
    import torch

    from omni_moe import omni_router

    x = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        omni_router(x, y, N, k)
    torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=None, help="comma-separated case numbers (default: all)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--router", default=None, metavar="T,N,k")
    ap.add_argument("--sparse", action="store_true",
                    help="also profile the SGD training step with dense and sparse expert gradients")
    args = ap.parse_args(argv)
    if args.router:
        return router_only(*(int(v) for v in args.router.split(",")))
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from omni_moe import OmniMoE, OmniMoEConfig
    from omni_moe.bench.launch_count import step_counts
    from omni_moe.bench.common import DenseMLP, report_threads

    report_threads("profile_layer.py")
    dev = "cpu" if args.dry else "cuda"
    dtype = torch.float32 if args.dry else torch.bfloat16
    sync = (lambda: None) if args.dry else torch.cuda.synchronize
    cases = DRY_CASES if args.dry else CASES
    if args.cases:
        cases = [cases[int(i)] for i in args.cases.split(",")]
    reps = 3 if args.dry else args.reps

    meta = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "device": "cpu (dry)" if args.dry else torch.cuda.get_device_name(), "dtype": str(dtype)}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        pass
    result = {"meta": meta, "cases": []}
    if not args.dry:
        result["call_costs_us"] = call_costs(dev, reps)
        print(json.dumps(result["call_costs_us"], indent=1), flush=True)
        result["router_t1024"] = router_t1024(dev, dtype)
        print(json.dumps(result["router_t1024"]), flush=True)
    for (T, H, I, E, k) in cases:
        torch.manual_seed(0)
        layer = OmniMoE(OmniMoEConfig(H, I, num_experts=E, num_experts_per_token=k)).to(dev).to(dtype)
        mlp = DenseMLP(H, I).to(dev).to(dtype)
        x = torch.randn(T, H, device=dev, dtype=dtype)
        row = {"case": [T, H, I, E, k]}
        counts = step_counts(layer, x, profile_cuda=not args.dry)
        row["triton_launches"] = counts["triton_launches"]
        row["autograd_nodes"] = counts["autograd_nodes"]
        if "cuda" in counts:
            row["cuda_kernels"] = counts["cuda"]["kernels"]
        row["host_ms"] = stage_host_ms(layer, mlp, x, reps, sync)
        if not args.dry:
            row["gpu_families_us"], row["gpu_kernels_us"], row["host_ops_us"] = gpu_breakdown(layer, x)
            if args.sparse:
                # the whole training step, SGD, dense then sparse expert gradients
                for sparse in (False, True):
                    layer.up_embed.sparse = layer.down_embed.sparse = sparse
                    opt = torch.optim.SGD(layer.parameters(), lr=1e-4)
                    row[f"sgd_step_{'sparse' if sparse else 'dense'}"] = dict(zip(
                        ("families_us", "kernels_us", "host_ops_us"), gpu_breakdown(layer, x, opt)))
                    del opt
                layer.up_embed.sparse = layer.down_embed.sparse = False
        result["cases"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k in ("case", "host_ms", "gpu_families_us")}),
              flush=True)
        del layer, mlp
        if not args.dry:
            torch.cuda.empty_cache()
    path = args.json or os.path.join(os.environ.get("OUT", os.path.join(ROOT, "out")), "profile_layer.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
