"""Router-backward launch-configuration sweep (not library code).

Times ``router_backward`` (kernel only, CUDA-graph replay, 20 calls per replay) on fresh
router indices with its default configuration (``bwd_config``) and with other lane
counts C, tokens per program, warps and pairs per loop step, checking every variant bit
for bit against ``router_backward_reference``.  Also times the eager call paths at
T = 1024 (``do_bench`` of the launcher and of ``torch.autograd.grad``).

The comparison with the earlier row-building kernels (docs/benchmarks.md, "Backward: how
the kernel got 4x faster") was measured with this script at commit abceee8, where those
kernels still existed.

    PYTHONPATH=. python3 scripts/bwd_experiment.py OUT_DIR
    PYTHONPATH=. python3 scripts/bwd_experiment.py --one T,N,k,VARIANT   # for ncu
"""
import json
import os
import sys

import torch
import triton

from omni_moe.reference import router_backward_reference
from omni_moe.triton import router_backward as rb
from omni_moe.triton.omni_router_optimized import pruned_router_forward

SHAPES = [(1024, 64, 16), (1024, 256, 32), (4096, 1024, 16), (16384, 256, 16), (65536, 256, 16),
          (16384, 256, 64), (4096, 64, 256)]


def variants(T, N, k):
    out = {"default": lambda g, idx: rb.router_backward(g, idx, N)}
    NP = triton.next_power_of_2(N)
    for c in (8, 16, 32):
        if c > NP:
            continue
        ng = min(NP, 1024) // c
        for m in (1, 2, 4):
            if ng * m > 64:
                continue
            for warps in (4, 8):
                for unroll in (1, 4):
                    if (warps == 8 or unroll == 1) and m != 2:
                        continue
                    tt = warps * (32 // c) * m
                    cfg = dict(C=c, TILE_T=tt, UNROLL=unroll, num_warps=warps)
                    out[f"lanes_c{c}_t{tt}_w{warps}_u{unroll}"] = (
                        lambda g, idx, cfg=cfg: rb.router_backward(g, idx, N, config=cfg))
    return out


def graph_us(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for _ in range(reps):
            fn()
    return triton.testing.do_bench(lambda: gr.replay(), return_mode="median") * 1e3 / reps


def inputs(T, N, k):
    x = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
    _, idx = pruned_router_forward(x, y, k)
    g = torch.randn(T, k, device="cuda").to(torch.bfloat16)
    return x, y, idx, g


def main(out):
    rows = []
    for T, N, k in SHAPES:
        torch.manual_seed(T + N + k)
        x, y, idx, g = inputs(T, N, k)
        rdx, rdy = router_backward_reference(g.cpu(), idx.cpu(), N)
        floor = (T * k * 6 + 2 * T * N * 2) / 3.0e12 * 1e6
        for name, fn in variants(T, N, k).items():
            try:
                dx, dy = fn(g, idx)
                exact = torch.equal(dx.cpu(), rdx) and torch.equal(dy.cpu(), rdy)
                tg = graph_us(lambda: fn(g, idx))
                row = dict(T=T, N=N, k=k, variant=name, graph_us=tg, floor_us=floor, exact=exact)
            except Exception as exc:  # report and go on
                row = dict(T=T, N=N, k=k, variant=name, error=repr(exc)[:300])
            rows.append(row)
            print(row, flush=True)
    # Host paths at T = 1024 (eager do_bench medians).
    for T, N, k in [(1024, 64, 16), (1024, 256, 16)]:
        x, y, idx, g = inputs(T, N, k)
        xl = x.clone().requires_grad_(True)
        yl = y.clone().requires_grad_(True)
        from omni_moe import omni_router
        s, _ = omni_router(xl, yl, N, k)
        t_launch = triton.testing.do_bench(lambda: rb.router_backward(g, idx, N), return_mode="median") * 1e3
        t_auto = triton.testing.do_bench(lambda: torch.autograd.grad(s, (xl, yl), g, retain_graph=True),
                                         return_mode="median") * 1e3
        t_graph = graph_us(lambda: rb.router_backward(g, idx, N))
        row = dict(T=T, N=N, k=k, variant="host", launch_us=t_launch, autograd_us=t_auto, graph_us=t_graph)
        rows.append(row)
        print(row, flush=True)
    json.dump(rows, open(os.path.join(out, "bwd_experiment.json"), "w"), indent=1)
    print(f"{'T':>6} {'N':>5} {'k':>3} {'variant':>14} {'graph':>8} {'floor':>6} exact")
    for r in rows:
        if "floor_us" in r:
            print(f"{r['T']:>6} {r['N']:>5} {r['k']:>3} {r['variant']:>14} {r['graph_us']:8.1f} "
                  f"{r['floor_us']:6.1f} {r['exact']!s:5}")
        else:
            print(r)


def ncu_target(spec):
    """Run one variant once at one shape (for ncu): spec = T,N,k,name."""
    T, N, k, name = spec.split(",")
    T, N, k = int(T), int(N), int(k)
    x, y, idx, g = inputs(T, N, k)
    fn = variants(T, N, k)[name]
    fn(g, idx)
    torch.cuda.synchronize()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        ncu_target(sys.argv[2])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else ".")
