"""Timing and environment helpers shared by the benchmarks.

On CUDA, times are medians of CUDA-event timed calls with an L2 flush before each, as
``triton.testing.do_bench`` takes them (callers also rotate among input sets larger than
L2).  Without CUDA, a ``time.perf_counter`` median stands in: good enough to compare
PyTorch paths on a CPU, meaningless for Triton kernels run by the interpreter.  Either
way a median is over at least ``MIN_SAMPLES`` calls after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import json
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


def parse_names(text: str, choices, what: str) -> list[str]:
    """Comma-separated names, each one of ``choices``; argparse error naming ``what``."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in choices]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {', '.join(choices)}")
    return names


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


def capture_graph(fn, warmup=None, before_capture=None, warmup_calls: int = 3):
    """A CUDA graph of one call of ``fn``, as whole-network capture makes it: ``warmup``
    (default ``fn``) runs ``warmup_calls`` times on a side stream first (so lazy
    allocations and autotuning happen outside the capture), then ``before_capture`` (if
    given; e.g. dropping gradients so the graph allocates its own), then the capture.
    Replay with ``graph.replay()``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            (warmup or fn)()
    torch.cuda.current_stream().wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


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


def utc_now() -> str:
    """The current time, ISO 8601 in UTC, to the second (the date of a row or a run)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- CPU threads
# Slack before a busy machine counts as oversubscribed: the load average is a one-minute
# mean that a process which just ended or a short job keeps above zero for a while.
LOAD_SLACK_CORES = 0.5


def cpu_threads(processes: int = 1) -> dict:
    """The torch CPU threads of this process and what the machine offers them.

    ``cores`` are the CPUs this process may run on (``os.sched_getaffinity``, else
    ``os.cpu_count``).  ``busy`` is the 1-minute load average (``os.getloadavg``), a
    machine-wide count, scaled by cores / all CPUs, so a container pinned to a few
    cores of a loaded host is not charged the whole host's load.  The run is
    ``oversubscribed`` when ``processes`` x torch threads exceed the cores, or exceed
    the cores left idle (cores - busy) by more than ``LOAD_SLACK_CORES``: threads then
    wait for each other at every parallel region and CPU timings become slow and noisy.
    ``suggested_threads`` is what would fit the idle cores (at least 1).
    """
    threads = torch.get_num_threads()
    total_cpus = os.cpu_count() or 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = total_cpus
    cores = max(1, cores)
    try:
        load = float(os.getloadavg()[0])
    except (AttributeError, OSError):
        load = None
    busy = None if load is None else load * cores / max(cores, total_cpus)
    want = processes * threads
    idle = cores - (busy or 0.0)
    return {
        "torch_threads": threads,
        "interop_threads": torch.get_num_interop_threads(),
        "processes": processes,
        "cores_available": cores,
        "cpus_total": total_cpus,
        "load_1min": load,
        "busy_cores": busy,
        "oversubscribed": want > cores or want > idle + LOAD_SLACK_CORES,
        "suggested_threads": max(1, int(max(0.0, idle) + 0.5) // processes),
    }


def describe_threads(info: dict) -> str:
    """One line: the threads, the cores and the load of ``cpu_threads()``."""
    procs = f" x {info['processes']} processes" if info.get("processes", 1) > 1 else ""
    load = ("" if info.get("load_1min") is None else
            f", 1-minute load {info['load_1min']:.2f} (~{info['busy_cores']:.1f} of these cores busy)")
    n, cores = info["torch_threads"], info["cores_available"]
    return (f"{n} torch thread{'s' * (n != 1)}{procs} on {cores} core{'s' * (cores != 1)} available "
            f"to this process (of {info['cpus_total']}){load}")


def report_threads(prog: str, processes: int = 1) -> dict:
    """Print the thread line of ``cpu_threads(processes)`` on stdout and, when the run is
    oversubscribed, a one-line warning on stderr; returns the dict (for a --json file)."""
    info = cpu_threads(processes)
    print(f"{prog}: CPU threads: {describe_threads(info)}", flush=True)
    if info["oversubscribed"]:
        n = info["suggested_threads"]
        fix = (f"set OMP_NUM_THREADS={n} or torch.set_num_threads({n})" if n < info["torch_threads"]
               else "other processes hold the cores: run when the machine is quieter")
        print(f"{prog}: warning: CPU oversubscribed ({describe_threads(info)}): CPU timings will be "
              f"slow and noisy; {fix}", file=sys.stderr, flush=True)
    return info


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
        "date": utc_now(),
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
        "cpu_threads": cpu_threads(),
        "argv": sys.argv,
    }


# --------------------------------------------------------------------------- command line
class UsageError(Exception):
    """A user error (bad argument, unreadable file): one line on stderr, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


# Accepted spellings of --dtype and the name each stands for.
DTYPE_SPELLINGS = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
                   "fp32": "fp32", "float32": "fp32"}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(text: str) -> str:
    """'bf16' or 'bfloat16' -> 'bf16' (likewise fp16/float16, fp32/float32)."""
    name = DTYPE_SPELLINGS.get(text.strip().lower())
    if name is None:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}; choose from bf16 (bfloat16), fp16 (float16), fp32 (float32)")
    return name


def _budget_ms(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds, got {text!r}")
    if not v >= 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def cases_type(fields, check):
    """argparse type for ``--cases``: 'a,b,c;a,b,c' -> [(a, b, c), ...].

    ``fields`` names the integers of one case; ``check(case)`` returns why a case is
    invalid, or None.
    """
    spec = ",".join(fields)

    def cases(text: str):
        out = []
        for part in text.split(";"):
            part = part.strip()
            if not part:
                continue
            try:
                vals = tuple(int(v) for v in part.split(","))
            except ValueError:
                vals = ()
            if len(vals) != len(fields):
                raise argparse.ArgumentTypeError(f"bad case {part!r}: expected {spec} ({len(fields)} integers)")
            why = check(vals)
            if why:
                raise argparse.ArgumentTypeError(f"bad case {part!r}: {why}")
            out.append(vals)
        if not out:
            raise argparse.ArgumentTypeError("no cases given")
        return out

    return cases


def add_common_arguments(p: argparse.ArgumentParser, fields, check, default_cases: str,
                         parse_cases=None) -> None:
    """The options every ``omni-moe bench`` benchmark has, with the same names and defaults.

    ``parse_cases``: the type of ``--cases`` when a benchmark reads more than one form
    (default ``cases_type(fields, check)``)."""
    spec = ",".join(fields)
    p.add_argument("--cases", type=parse_cases or cases_type(fields, check), default=None,
                   metavar=f"'{spec};...'", help=f"cases to run, separated by ';' (default: {default_cases})")
    p.add_argument("--dtype", type=parse_dtype, default="bf16", metavar="DTYPE",
                   help="bf16 (bfloat16), fp16 (float16) or fp32 (float32); default bf16")
    p.add_argument("--warmup-ms", type=_budget_ms, default=25.0, metavar="MS",
                   help="warm-up time budget per measurement, ms (default 25)")
    p.add_argument("--rep-ms", type=_budget_ms, default=100.0, metavar="MS",
                   help=f"timing budget per measurement, ms (default 100; at least {MIN_SAMPLES} "
                   "timed calls whatever the budget)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random inputs and weights of every case (default 0)")
    p.add_argument("--json", metavar="PATH",
                   help="write all rows and the environment here (after every case)")
    p.add_argument("--plot", metavar="PNG",
                   help="draw a bar chart (needs matplotlib: pip install 'omni-moe[plot]')")
    p.add_argument("--from-json", metavar="PATH",
                   help="run nothing: print the table (and --plot) of a saved --json file "
                   "(--cases and --json are then errors)")


def add_model_size_arguments(p: argparse.ArgumentParser, *, layers: int, hidden: int, heads: int,
                             experts: int, k: int | None, experts_help: str = "E, a perfect square",
                             k_help: str | None = None) -> None:
    """The decoder-size options of the Llama benchmarks (benchmarks/hf_model.py,
    benchmarks/generate.py): the same names, each script's own defaults (they size
    different models)."""
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--experts", type=int, default=experts, help=experts_help)
    p.add_argument("--k", type=int, default=k, help=k_help)


def _check_writable(option: str, path: str) -> None:
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        existed = os.path.exists(path)
        with open(path, "a"):
            pass
        if not existed:
            os.remove(path)
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write there ({e.strerror or e})")


def check_run_arguments(args) -> None:
    """What can be known wrong before any work: option clashes, a missing matplotlib for
    --plot, output paths that cannot be written.  Raises UsageError."""
    if args.from_json:
        for option, value in (("--cases", args.cases), ("--json", args.json)):
            if value is not None:
                raise UsageError(f"{option} cannot be combined with --from-json "
                                 "(a saved run is reprinted as it was)")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib, which is not installed "
                         "(pip install 'omni-moe[plot]')")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            _check_writable(option, path)


def load_saved(path: str, benchmark: str, looks_right) -> dict:
    """The dict of a saved ``--json`` file of ``benchmark``; UsageError if the file is
    missing, unreadable, not JSON, or ``looks_right(data)`` is false."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--from-json {path}: no such file")
    except OSError as e:
        raise UsageError(f"--from-json {path}: cannot read it ({e.strerror or e})")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--from-json {path}: not a JSON file ({' '.join(str(e).split())})")
    if not (isinstance(data, dict) and isinstance(data.get("rows"), list)
            and all(isinstance(r, dict) for r in data["rows"]) and looks_right(data)):
        raise UsageError(f"--from-json {path}: not a file written by "
                         f"'omni-moe bench {benchmark} --json'")
    return data


class DenseMLP(torch.nn.Module):
    """The layer's shared SwiGLU MLP alone, as a module (the dense baseline of the
    training-step benchmarks): down(act(gate(x)) * up(x)) with ``nn.Linear`` weights."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = act

    def forward(self, x):
        from ..ops import swiglu

        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.act))


def report_saved(args, kind: str, looks_like, report) -> bool:
    """``--from-json``: reprint the saved ``kind`` run ("router"/"layer") with ``report(
    saved, plot_path)``; False when the option is not given.  Content that does not fit
    the table is a UsageError naming the file."""
    if not args.from_json:
        return False
    saved = load_saved(args.from_json, kind, looks_like)
    try:
        report(saved, args.plot)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UsageError(f"--from-json {args.from_json}: unexpected content "
                         f"({type(e).__name__}: {e})")
    return True
