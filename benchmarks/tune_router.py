"""Check and time the pruned router's launch rules against nearby configurations.

A maintainer reruns this on a GPU after changing a kernel or a rule: for each shape, every
candidate configuration (the rule's choice first) is checked against brute force on a
sample of rows, then timed on rotating input sets larger than L2, eagerly (``do_bench``
median, host included) and from a CUDA graph (GPU time only).  The rule should be the
fastest within noise; docs/router.md records the measurements behind the rules.

    PYTHONPATH=. python benchmarks/tune_router.py --json OUT.json [--cases "T,N,k;..."]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace

import torch

from omni_moe.bench.common import environment, report_threads
from omni_moe.ops.router import backward, pruned
from omni_moe.ops.router.reference import router_bruteforce

DEFAULT_CASES = "1024,256,16;4096,256,16;4096,1024,16;16384,256,16;16384,256,32;65536,256,16"


def forward_candidates(T: int, N: int, k: int):
    """The rule's choice, then the other kernel's rule and one-step neighbours."""
    rule = pruned.default_config(T, N, k)
    out = [("rule", rule)]
    if pruned.stream_ok(N, k):
        s = pruned.default_config(T, N, k, kernel="stream")
        lpts = {max(1, s.lpt // 2), s.lpt, min(s.lpt * 2, 32, pruned._pow2(N) // 16)}
        for lpt in sorted(lpts):
            for warps in (2, 4, 8):
                out.append((f"stream lpt{lpt} w{warps}", replace(s, lpt=lpt, warps=warps, gsplit=lpt > 1)))
    w = pruned.default_config(T, N, k, kernel="warp")
    out.append(("warp rule", w))
    for tile_t, warps in ((1, 1), (2, 2), (4, 4)):
        out.append((f"warp t{tile_t} w{warps}", replace(w, tile_t=tile_t, warps=warps)))
    if pruned.threshold_ok(N, k, w.lm):
        out.append(("warp thresh" if not w.thresh else "warp full-row", replace(w, thresh=not w.thresh)))
    seen, unique = set(), []
    for name, cfg in out:
        if cfg not in seen:
            seen.add(cfg)
            unique.append((name, cfg))
    return unique


def _sets(T, N, k, dtype, count):
    g = torch.Generator(device="cuda").manual_seed(T + N + k)
    return [(torch.randn(T, N, device="cuda", generator=g).to(dtype),
             torch.randn(T, N, device="cuda", generator=g).to(dtype)) for _ in range(count)]


def _graph_us(fn, sets, calls=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for a in sets:
            fn(*a)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*sets[i % len(sets)])
    import triton.testing

    return triton.testing.do_bench(graph.replay, return_mode="median") * 1e3 / calls


def tune_case(T, N, k, dtype):
    import triton.testing

    n_sets = max(2, min(64, (4 * 50 * 2**20) // (2 * T * N * dtype.itemsize)))
    sets = _sets(T, N, k, dtype, n_sets)
    x, y = sets[0]
    rows = torch.randperm(T, generator=torch.Generator().manual_seed(0))[:64].cuda()
    ref_s, _ = router_bruteforce(x[rows].cpu(), y[rows].cpu(), k)
    results = []
    for name, cfg in forward_candidates(T, N, k):
        s, i = pruned.pruned_router_forward(x, y, k, config=cfg)
        ok = torch.equal(s[rows].cpu().float().nan_to_num(), ref_s.float().nan_to_num())
        it = iter(range(10**9))
        eager = triton.testing.do_bench(
            lambda: pruned.pruned_router_forward(*sets[next(it) % n_sets], k, config=cfg),
            return_mode="median") * 1e3
        gpu = _graph_us(lambda a, b: pruned.pruned_router_forward(a, b, k, config=cfg), sets)
        results.append(dict(T=T, N=N, k=k, op="forward", variant=name, config=asdict(cfg),
                            exact=ok, eager_us=eager, gpu_us=gpu))
    _, idx = pruned.pruned_router_forward(x, y, k)
    grad = torch.randn(T, k, device="cuda").to(dtype)
    b = backward.default_config(N)
    for name, cfg in (("rule", b), ("c/2", replace(b, c=max(1, b.c // 2))),
                      ("c*2", replace(b, c=min(b.bn, b.c * 2))), ("unroll 2", replace(b, unroll=2)),
                      ("warps 8", replace(b, warps=8, tile_t=b.tile_t * 2))):
        dx, dy = backward.router_backward(grad, idx, N, config=cfg)
        rx, ry = backward.router_backward(grad, idx, N)
        ok = torch.equal(dx, rx) and torch.equal(dy, ry)
        gpu = _graph_us(lambda g, i: backward.router_backward(g, i, N, config=cfg), [(grad, idx)])
        results.append(dict(T=T, N=N, k=k, op="backward", variant=name, config=asdict(cfg),
                            exact=ok, gpu_us=gpu))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES, help='"T,N,k;T,N,k"')
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--json", default=None, help="write the rows and the environment here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    try:
        cases = [tuple(int(v) for v in c.split(",")) for c in args.cases.split(";") if c.strip()]
        assert all(len(c) == 3 for c in cases)
    except (ValueError, AssertionError):
        p.error(f'--cases must look like "T,N,k;T,N,k", got {args.cases!r}')
    report_threads("tune_router.py")
    dtype = getattr(torch, args.dtype)
    rows = []
    for T, N, k in cases:
        for r in tune_case(T, N, k, dtype):
            rows.append(r)
            extra = f" eager {r['eager_us']:8.1f}" if "eager_us" in r else " " * 15
            print(f"{T:>6} {N:>5} {k:>3} {r['op']:<8} {r['variant']:<22} exact={r['exact']!s:<5}"
                  f"{extra} gpu {r['gpu_us']:8.1f} us", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=environment(), rows=rows), f, indent=1)
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
