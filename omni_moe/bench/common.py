"""Timing and environment helpers shared by the benchmarks.

On CUDA, times are ``triton.testing.do_bench`` medians (it flushes L2 before every timed
call; callers also rotate among input sets larger than L2).  Without CUDA, a
``time.perf_counter`` median over the same time budget stands in: good enough to compare
PyTorch paths on a CPU, meaningless for Triton kernels run by the interpreter.
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

# Used when the device does not report its L2 size (H100: 50 MiB).
DEFAULT_L2_BYTES = 50 * 2**20


def has_cuda() -> bool:
    return torch.cuda.is_available()


def synchronize() -> None:
    if has_cuda():
        torch.cuda.synchronize()


def median_ms(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median wall time of one call of ``fn`` in milliseconds."""
    if has_cuda():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    est = max(time.perf_counter() - t0, 1e-9)
    for _ in range(min(1000, int(warmup_ms / 1e3 / est))):
        fn()
    times = []
    for _ in range(max(1, min(1000, int(rep_ms / 1e3 / est)))):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def graph_us(fn, argsets, min_calls: int = 20) -> float | None:
    """GPU time of one call of ``fn(*a)``, from CUDA-graph replay; None without CUDA.

    One graph holds calls over every argument set (at least ``min_calls`` calls), so the
    kernels read inputs larger than L2 as in ``median_ms``; replaying it removes the host
    time (Python, argument checks, launch) that eager medians of microsecond kernels
    are made of.  The replay is timed with do_bench (median), divided by the calls.
    """
    if not has_cuda():
        return None
    import torch
    import triton.testing

    calls = list(argsets) * max(1, -(-min_calls // max(1, len(argsets))))
    for a in argsets:
        fn(*a)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for a in calls:
            fn(*a)
    ms = triton.testing.do_bench(graph.replay, return_mode="median")
    del graph
    return float(ms) * 1e3 / len(calls)


def first_call_s(fn):
    """(result, seconds) of one call of ``fn``, synchronised: compile time included."""
    synchronize()
    t0 = time.perf_counter()
    out = fn()
    synchronize()
    return out, time.perf_counter() - t0


def cycling(fn, argsets):
    """A no-argument callable that calls ``fn(*a)`` for the next ``a`` of ``argsets``.

    Rotating among input sets whose total size exceeds L2 keeps a small problem from
    being timed out of a warm cache.
    """
    it = itertools.cycle(argsets)
    return lambda: fn(*next(it))


def l2_bytes() -> int:
    if not has_cuda():
        return 0
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def num_sets(bytes_per_set: int, target_bytes: int, max_sets: int = 4096) -> int:
    """How many input sets of ``bytes_per_set`` it takes to exceed ``target_bytes``."""
    if target_bytes <= 0 or bytes_per_set <= 0:
        return 1
    return max(1, min(max_sets, math.ceil(target_bytes / bytes_per_set) + 1))


def warm_up_triton() -> None:
    """Compile and run one trivial kernel, so the first-call time of a real kernel
    measures that kernel's compilation, not Triton's one-time backend start-up."""
    if not has_cuda():
        return
    import triton
    import triton.language as tl

    @triton.jit
    def _fill(X, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(X + offs, 1.0, mask=offs < n)

    x = torch.empty(100, device="cuda")
    _fill[(1,)](x, 100, BLOCK=128)
    torch.cuda.synchronize()


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment() -> dict:
    """What a benchmark result needs to be reproduced and compared."""
    import omni_moe

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = has_cuda()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "l2_bytes": l2_bytes() if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "omni_moe": omni_moe.__version__,
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "argv": sys.argv,
    }
