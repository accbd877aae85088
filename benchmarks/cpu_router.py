"""Time the exact CPU router algorithms (pruned vs full product) and print a table.

    python benchmarks/cpu_router.py [--threads N] [--dtype float32|bfloat16] [--wall] [--large-k]

``--large-k``: larger k instead, the pruned reference against the large-k algorithm
(``router_large_k``; the full product too where its buffer is allowed), with
``router_cpu``'s choice: the table behind ``use_pruned``.

Each cell is the best of 5 ``timeit`` repeats (per-call microseconds, the number of calls
per repeat chosen by ``Timer.autorange``) of the process's CPU time, one torch thread by
default: on a shared machine wall time mostly measures the other processes (``--wall``
times wall clock instead).  Both algorithms are checked against the brute force first.  The rule in ``omni_moe.ops.router.cpu.use_full_product`` comes from
this table (docs/cpu.md).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
import timeit

import torch

from omni_moe.ops.router.reference import router_bruteforce, router_pruned
from omni_moe.bench.common import report_threads
from omni_moe.ops.router.cpu import (
    router_full_product,
    router_large_k,
    use_full_product,
    use_pruned,
)

CASES = [(T, N, k) for T in (64, 1024) for N in (8, 16, 32, 64) for k in (4, 7, 16)]
LARGE_K_CASES = [(T, N, k) for T, N in ((64, 64), (1024, 64), (256, 256)) for k in (16, 32, 64, 128, 256)]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def per_call_us(fn, wall: bool = False) -> float:
    t = timeit.Timer(fn, timer=time.perf_counter if wall else time.process_time)
    n, _ = t.autorange()
    return min(t.repeat(repeat=5, number=n)) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    p.add_argument("--wall", action="store_true", help="time wall clock, not CPU time")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--large-k", action="store_true", help="the large-k table (see above)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    report_threads("cpu_router.py")
    dtype = getattr(torch, args.dtype)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; threads {torch.get_num_threads()}; {args.dtype}; "
          f"{'wall' if args.wall else 'CPU'} time")
    if args.large_k:
        large_k_table(dtype, args.wall)
        return
    print(f"{'T':>5} {'N':>3} {'k':>3} {'pruned us':>10} {'full us':>10} {'faster':>8} {'rule':>8}")
    g = torch.Generator().manual_seed(0)
    for T, N, k in CASES:
        x = torch.randn(T, N, generator=g).to(dtype)
        y = torch.randn(T, N, generator=g).to(dtype)
        ref = router_bruteforce(x, y, k)
        for fn in (router_pruned, router_full_product):
            s, i = fn(x, y, k)
            assert torch.equal(s, ref[0]) and torch.equal(i, ref[1]), fn.__name__
        tp = per_call_us(lambda: router_pruned(x, y, k), args.wall)
        tf = per_call_us(lambda: router_full_product(x, y, k), args.wall)
        rule = "full" if use_full_product(T, N, k, dtype) else "pruned"
        print(f"{T:>5} {N:>3} {k:>3} {tp:>10.1f} {tf:>10.1f} {'full' if tf < tp else 'pruned':>8} {rule:>8}")


def large_k_table(dtype, wall: bool) -> None:
    print(f"{'T':>5} {'N':>3} {'k':>3} {'pruned us':>10} {'large-k us':>11} {'full us':>10} {'rule':>8}")
    g = torch.Generator().manual_seed(0)
    for T, N, k in LARGE_K_CASES:
        # log-softmax rows, as the layer's router sees them
        x = torch.randn(T, N, generator=g).log_softmax(-1).to(dtype)
        y = torch.randn(T, N, generator=g).log_softmax(-1).to(dtype)
        ref = router_bruteforce(x, y, k)[0]
        for fn in (router_pruned, router_large_k):
            assert torch.equal(fn(x, y, k)[0], ref), fn.__name__
        tp = per_call_us(lambda: router_pruned(x, y, k), wall)
        tl = per_call_us(lambda: router_large_k(x, y, k), wall)
        full = use_full_product(T, N, k, dtype)
        tf = per_call_us(lambda: router_full_product(x, y, k), wall) if full else float("nan")
        rule = "full" if full else ("pruned" if use_pruned(T, N, k) else "large-k")
        print(f"{T:>5} {N:>3} {k:>3} {tp:>10.0f} {tl:>11.0f} {tf:>10.0f} {rule:>8}", flush=True)


if __name__ == "__main__":
    main()
