"""Host time of the router's eager call paths (not library code).

do_bench medians of microsecond kernels hide host time under its L2 flush, and show it
only when the host is slower than the flush; this script measures the host directly:
per-call wall time of N back-to-back calls (no synchronisation inside the loop; the GPU
work per call is a few microseconds, so the host is the bottleneck), at T = 1024.

    PYTHONPATH=. python3 scripts/host_overhead.py OUT_DIR
"""
import json
import os
import sys
import time

import torch


def per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main(out):
    from omni_moe import omni_router
    from omni_moe.bench.router import noop_router_graph
    from omni_moe.router import _forward_impl, check_router_args
    from omni_moe.triton.omni_router_optimized import pruned_router_forward
    from omni_moe.triton.router_backward import router_backward

    rows = []
    for T, N, k in [(1024, 64, 16), (1024, 256, 16)]:
        x = torch.randn(T, N, device="cuda").bfloat16()
        y = torch.randn_like(x)
        g = torch.randn(T, k, device="cuda").bfloat16()
        s_out = torch.empty(T, k, device="cuda", dtype=torch.bfloat16)
        i_out = torch.empty(T, k, device="cuda", dtype=torch.int32)
        _, idx = pruned_router_forward(x, y, k)
        dx0, dy0 = torch.empty_like(x), torch.empty_like(y)
        xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
        s, _ = omni_router(xl, yl, N, k)
        s_noop, noop_leaves = noop_router_graph(x, y, k)
        cases = {
            "empty kernel-free torch op (x.view(-1))": lambda: x.view(-1),
            "torch.empty x2": lambda: (torch.empty(T, N, device="cuda"), torch.empty(T, N, device="cuda")),
            "check_router_args": lambda: check_router_args(x, y, N, k),
            "pruned_router_forward (launcher)": lambda: pruned_router_forward(x, y, k),
            "pruned_router_forward, preallocated": lambda: pruned_router_forward(x, y, k, s_out, i_out),
            "_forward_impl": lambda: _forward_impl(x, y, k, "pruned"),
            "omni_router, no grad": lambda: omni_router(x, y, N, k),
            "omni_router, requires grad (autograd.Function)": lambda: omni_router(xl, yl, N, k),
            "router_backward (launcher)": lambda: router_backward(g, idx, N),
            "router_backward, preallocated": lambda: router_backward(g, idx, N, dx0, dy0),
            "autograd.grad through the router": lambda: torch.autograd.grad(s, (xl, yl), g, retain_graph=True),
            "autograd.grad through a no-op Function": lambda: torch.autograd.grad(s_noop, noop_leaves, g, retain_graph=True),
        }
        for name, fn in cases.items():
            us = per_call_us(fn)
            rows.append(dict(T=T, N=N, k=k, path=name, host_us_per_call=us))
            print(f"{T:>5} {N:>4} {k:>3}  {us:8.1f} us  {name}", flush=True)
    json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                   triton=__import__("triton").__version__, rows=rows),
              open(os.path.join(out, "host_overhead.json"), "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
