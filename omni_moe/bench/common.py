"""Timing and environment helpers shared by the benchmarks.

On CUDA, times are medians of CUDA-event timed calls with an L2 flush before each, as
``triton.testing.do_bench`` takes them (callers also rotate among input sets larger than
L2).  Without CUDA, a ``time.perf_counter`` median stands in: good enough to compare
PyTorch paths on a CPU, meaningless for Triton kernels run by the interpreter.  Either
way a median is over at least ``MIN_SAMPLES`` calls after warm-up.
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


# Every printed median is over at least this many timed calls, taken after warm-up.
MIN_SAMPLES = 10
# Upper bound of timed calls on CPU, where a sample costs host time only.
MAX_CPU_SAMPLES = 1000
# Bytes written between timed CUDA calls to evict L2 (as triton.testing.do_bench does).
_FLUSH_BYTES = 256 * 2**20


def _reset_grads(grad_to_none) -> None:
    for t in grad_to_none or ():
        t.grad = None


def _sample_counts(est_ms, warmup_ms, rep_ms, min_samples, max_samples=None):
    """(warm-up calls, timed calls) from a per-call estimate taken after the first call."""
    est_ms = max(est_ms, 1e-6)
    n_warm = max(1, int(warmup_ms / est_ms))
    n_rep = max(min_samples, int(rep_ms / est_ms))
    if max_samples is not None:
        n_warm, n_rep = min(n_warm, max_samples), max(min_samples, min(n_rep, max_samples))
    return n_warm, n_rep


def samples_ms(fn, warmup_ms: float = 25, rep_ms: float = 100, min_samples: int = MIN_SAMPLES,
               grad_to_none=None, clock=time.perf_counter, cuda: bool | None = None) -> list[float]:
    """Timed calls of ``fn``, ms each: at least ``min_samples`` of them, after warm-up.

    The first call (compilation, allocator growth) is run and discarded; the per-call
    estimate that sizes warm-up and timing comes from the calls after it, so a slow first
    call cannot shrink the sample.  On CUDA each call is timed with CUDA events after an
    L2 flush, like ``triton.testing.do_bench``; on CPU with ``clock`` around the call.
    ``grad_to_none``: tensors whose ``.grad`` is reset before every call, outside the timing.
    """
    cuda = has_cuda() if cuda is None else cuda
    if cuda:
        return _cuda_samples(fn, warmup_ms, rep_ms, min_samples, grad_to_none)
    _reset_grads(grad_to_none)
    fn()
    est = []
    for _ in range(3):
        _reset_grads(grad_to_none)
        t0 = clock()
        fn()
        est.append((clock() - t0) * 1e3)
    n_warm, n_rep = _sample_counts(statistics.median(est), warmup_ms, rep_ms, min_samples,
                                   MAX_CPU_SAMPLES)
    for _ in range(n_warm):
        _reset_grads(grad_to_none)
        fn()
    times = []
    for _ in range(n_rep):
        _reset_grads(grad_to_none)
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1e3)
    return times


def _cuda_samples(fn, warmup_ms, rep_ms, min_samples, grad_to_none):
    flush = torch.empty(_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")

    def timed(n):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for s, e in zip(starts, ends):
            _reset_grads(grad_to_none)
            flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    _reset_grads(grad_to_none)
    fn()
    torch.cuda.synchronize()
    n_warm, n_rep = _sample_counts(statistics.median(timed(5)), warmup_ms, rep_ms, min_samples)
    for _ in range(n_warm):
        _reset_grads(grad_to_none)
        fn()
    times = timed(n_rep)
    del flush
    return times


def median_ms(fn, warmup_ms: float = 25, rep_ms: float = 100, min_samples: int = MIN_SAMPLES,
              grad_to_none=None) -> float:
    """Median time of one call of ``fn`` in milliseconds (see ``samples_ms``)."""
    times = samples_ms(fn, warmup_ms, rep_ms, min_samples, grad_to_none)
    if len(times) < min_samples:
        raise RuntimeError(f"{len(times)} timed calls, fewer than {min_samples}")
    return statistics.median(times)


def host_ms(fn, samples: int = MIN_SAMPLES, grad_to_none=None) -> float:
    """Median host time of issuing one call of ``fn`` on CUDA: the device is idle before
    the call (synchronised) and the clock stops when ``fn`` returns, before the GPU
    finishes, so this is the Python, dispatcher and launch time of one step."""
    _reset_grads(grad_to_none)
    fn()
    times = []
    for _ in range(samples):
        _reset_grads(grad_to_none)
        synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    synchronize()
    return statistics.median(times)


def cuda_launches(fn) -> int | None:
    """Device activities (kernels, memsets, copies) of one call of ``fn``, counted with
    torch.profiler; None without CUDA."""
    if not has_cuda():
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def graph_us(fn, argsets, min_calls: int = 20) -> float | None:
    """GPU time of one call of ``fn(*a)``, from CUDA-graph replay; None without CUDA.

    One graph holds calls over every argument set (at least ``min_calls`` calls), so the
    kernels read inputs larger than L2 as in ``median_ms``; replaying it removes the host
    time (Python, argument checks, launch) that eager medians of microsecond kernels
    are made of.  The replay is timed with ``median_ms``, divided by the calls.
    """
    if not has_cuda():
        return None
    calls = list(argsets) * max(1, -(-min_calls // max(1, len(argsets))))
    for a in argsets:
        fn(*a)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for a in calls:
            fn(*a)
    ms = median_ms(graph.replay)
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
