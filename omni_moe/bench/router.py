"""``omni-moe bench router``: every router implementation, forward and backward.

Implementations (``--impls``):

    original      omni_moe.triton.omni_router.triton_omni_router_func (Triton, full scan)
    optimized     omni_moe.triton.omni_router_optimized.triton_omni_router_func_optimized
                  (Triton, exact pruned; what ``omni_moe.omni_router`` runs)
    torch_pruned  omni_moe.ops.router.cpu.router_pruned (PyTorch, exact pruned, the contract's
                  NaN/tie order through int64 keys: the CPU path)
    torch_topk    omni_moe.ops.router.reference.router_product_key_topk (PyTorch, the product-key
                  trick with plain torch.topk, as PEER-style code writes it)
    torch_brute   omni_moe.ops.router.reference.router_bruteforce (PyTorch, all N*N pairs); only
                  where T*N*N*4 bytes < --brute-max-gib

The PyTorch ones are differentiable through ordinary torch ops (gathers of float32 logits), so their
backward is whatever autograd makes of them.

For every case and implementation, on the same inputs:

- check: scores equal the reference's (brute force where it is small, else the exact
  pruned PyTorch reference), indices in range, distinct per row and consistent with the
  scores; gradients equal ``router_backward_reference`` for the implementation's own
  indices.  Checked on the first call and again after timing ('ok' column).
- forward: median time of the call under ``torch.no_grad()``.
- backward: median time of ``torch.autograd.grad(scores, (x, y), g, retain_graph=True)``
  on a graph built beforehand: the autograd engine plus the backward kernels, nothing
  of the forward and no gradient accumulation into ``.grad``.
- both rotate among enough input sets that their total size exceeds 2x L2 (the timer also
  flushes L2 before every timed call).
- graph columns (Triton implementations on CUDA, when the eager forward is under 1 ms):
  'fwd graph' is the forward call and 'bwd kernel graph' the backward kernel alone
  (``router_backward`` on the implementation's indices), each timed by replaying a CUDA
  graph of 20+ calls over the rotating sets: GPU time without the host.  'atomic bwd
  graph' times the peer ``atomic_router_backward`` the same way: one float32 atomic add
  per pair and axis into zeroed rows, then a cast -- what a non-deterministic backward
  costs (not a library path).  'autograd engine' is a control: ``torch.autograd.grad``
  through a one-node graph whose backward launches nothing, timed like the backward
  column (what the engine alone costs).
- first call (Triton implementations): seconds of the first forward and first backward
  call of this shape in this process, compilation included.  The Triton cache points to
  a fresh directory for the run (unless --reuse-triton-cache), so nothing comes from an
  earlier run; a case or implementation whose kernels were already compiled in this run
  (same kernel, N, k, dtype, launch configuration; e.g. the backward kernel, which both
  Triton implementations share) shows only its launch and run time.
- HBM floor: forward reads 2*T*N*b bytes of logits and writes T*k*(b+4) of scores and
  int32 indices; backward reads T*k*(b+4) and writes 2*T*N*b: the same byte count, at
  --hbm-tbps (3.0 TB/s, H100 device-to-device copy).  'floor/time' = floor / measured.

Without CUDA the table keeps the columns that mean something on a CPU (no graph,
first-call or HBM-floor columns) and the plot draws no floor.

--json saves the rows and the environment after every case; --from-json reprints (and
--plot redraws) a saved run without running anything.

The process exits 1 if any check fails, 2 on bad arguments (one line on stderr).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import sys
import tempfile

import triton
import triton.language as tl

from . import common

IMPLS = {
    "original": ("omni_moe.triton.omni_router", "triton_omni_router_func", True),
    "optimized": ("omni_moe.triton.omni_router_optimized", "triton_omni_router_func_optimized", True),
    "torch_pruned": ("omni_moe.ops.router.cpu", "router_pruned", False),
    "torch_topk": ("omni_moe.ops.router.reference", "router_product_key_topk", False),
    "torch_brute": ("omni_moe.ops.router.reference", "router_bruteforce", False),
}

DEFAULT_CASES = [
    (1024, 64, 16), (1024, 64, 32),
    (1024, 128, 16), (1024, 128, 32),
    (1024, 256, 16), (1024, 256, 32),
    (16384, 256, 16), (16384, 256, 32),
    (65536, 256, 16),
    (1024, 512, 16),
    (4096, 1024, 16),
]
# Without CUDA: small enough for Triton's interpreter.
CPU_CASES = [(64, 8, 4), (64, 16, 7), (32, 32, 16)]
# Under the interpreter, Triton implementations skip cases with more pairs than this.
INTERPRET_MAX_PAIRS = 2**17
# Brute force is the oracle up to this size; above it, the exact pruned reference is.
BRUTE_ORACLE_MAX_BYTES = 256 * 2**20



@triton.jit
def _atomic_bwd_kernel(G, IDX, DX, DY, total, K, N, stride_gt, stride_gk, stride_it, stride_ik,
                       BLOCK: tl.constexpr):
    # One (token, slot) pair per lane: its gradient atomically added to dx[t, idx div N]
    # and dy[t, idx mod N] (float32 rows, zeroed by the caller).
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = p < total
    t = p // K
    r = p - t * K
    e = tl.load(IDX + t * stride_it + r * stride_ik, mask=ok, other=0)
    g = tl.load(G + t * stride_gt + r * stride_gk, mask=ok, other=0.0).to(tl.float32)
    ex = e // N
    tl.atomic_add(DX + t * N + ex, g, mask=ok, sem="relaxed")
    tl.atomic_add(DY + t * N + (e - ex * N), g, mask=ok, sem="relaxed")


def atomic_router_backward(grad, indices, n: int):
    """The router backward by atomic scatter: a benchmark peer, not a library path.

    One float32 atomic add per (pair, axis) into zeroed (T, n) rows, then one cast to
    grad's dtype: three launches (zero fill, scatter, cast).  Float additions in
    whatever order the atomics land, so not deterministic; within the same error bound
    as any float32 sum of the pairs."""
    import torch

    T, K = indices.shape
    acc = torch.zeros((2, T, n), dtype=torch.float32, device=grad.device)
    if T * K:
        block = 1024
        _atomic_bwd_kernel[(triton.cdiv(T * K, block),)](
            grad, indices, acc[0], acc[1], T * K, K, n, grad.stride(0), grad.stride(1),
            indices.stride(0), indices.stride(1), BLOCK=block)
    return acc[0].to(grad.dtype), acc[1].to(grad.dtype)


def check_case(case):
    T, N, k = case
    if T < 0 or N < 1 or not 0 <= k <= N * N:
        return "need T >= 0, N >= 1, 0 <= k <= N*N"
    return None


def parse_impls(text: str):
    return common.parse_names(text, IMPLS, "implementation(s)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common_arguments(p, ("T", "N", "k"), check_case,
                                "the standard H100 set on CUDA; small ones on CPU")
    p.add_argument("--impls", type=parse_impls, default=list(IMPLS), metavar="A,B",
                   help=f"implementations (default all: {','.join(IMPLS)})")
    p.add_argument("--skip-original", action="store_true",
                   help="leave out the original full-scan kernel (slow at large sizes)")
    p.add_argument("--brute-max-gib", type=float, default=4.0,
                   help="run torch_brute only where T*N*N*4 bytes are below this (default 4)")
    p.add_argument("--hbm-tbps", type=float, default=3.0, help="HBM bandwidth for the floor, TB/s (default 3.0)")
    p.add_argument("--rotate-mb", type=float, default=None,
                   help="total size of the rotated input sets, MiB (default 2x L2 on CUDA, no rotation on CPU)")
    p.add_argument("--reuse-triton-cache", action="store_true",
                   help="keep Triton's usual cache (first-call times then may not include compilation)")


def _load(name):
    """(callable(x, y, k), None); an import error is reported by the caller as a failed row."""
    module, attr, is_triton = IMPLS[name]
    fn = getattr(importlib.import_module(module), attr)
    if is_triton:
        return (lambda x, y, k: fn(x, y, x.shape[1], k)), None
    return fn, None


def _same(a, b) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def check(x, y, k, scores, indices, ref_scores, g, dx, dy):
    """Contract problems of one forward + backward (an empty list when all is well)."""
    import torch

    from omni_moe.ops.router.reference import router_backward_reference

    T, N = x.shape
    if tuple(scores.shape) != (T, k) or tuple(indices.shape) != (T, k):
        return [f"output shapes {tuple(scores.shape)}, {tuple(indices.shape)}, expected {(T, k)}"]
    problems = []
    if scores.dtype != x.dtype:
        problems.append(f"scores dtype {scores.dtype}")
    if indices.dtype != torch.int32:
        return problems + [f"indices dtype {indices.dtype}"]
    idx = indices.long()
    if T * k:
        if bool(((idx < 0) | (idx >= N * N)).any()):
            return problems + ["index out of range"]
        if k > 1:
            srt = idx.sort(dim=1).values
            if bool((srt[:, 1:] == srt[:, :-1]).any()):
                problems.append("duplicate index in a row")
        recomputed = (x.float().gather(1, idx // N) + y.float().gather(1, idx % N)).to(x.dtype)
        if not _same(scores, recomputed):
            problems.append("a score does not match its index")
        if not _same(scores, ref_scores):
            problems.append("scores differ from the reference")
    ref_dx, ref_dy = router_backward_reference(g, indices, N)
    # float32 sums in another order may round to a neighbouring value of the dtype.
    rtol = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[x.dtype]
    for name, got, want in (("dx", dx, ref_dx), ("dy", dy, ref_dy)):
        if got is None or got.shape != want.shape or got.dtype != want.dtype:
            problems.append(f"{name} has the wrong shape or dtype")
        elif not torch.allclose(got.float(), want.float(), rtol=rtol, atol=1e-5):
            err = (got.float() - want.float()).abs().max().item()
            problems.append(f"{name} differs from the reference (max abs error {err:.3g})")
    return problems


def noop_router_graph(x, y, k):
    """(scores, (x_leaf, y_leaf)): a one-node autograd graph shaped like the router's,
    whose backward launches nothing (it returns preallocated zero gradients).  Timing
    ``torch.autograd.grad`` on it measures the autograd engine alone."""
    import torch

    dx0, dy0 = torch.zeros_like(x), torch.zeros_like(y)

    class _Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return a.new_empty((a.shape[0], k))

        @staticmethod
        def backward(ctx, gs):
            return dx0, dy0

    xl, yl = x.detach().requires_grad_(), y.detach().requires_grad_()
    return _Noop.apply(xl, yl), (xl, yl)


def _engine_floor_us(x, y, k, g, args, common):
    """Control for the backward column: ``torch.autograd.grad`` through
    ``noop_router_graph``, timed like the real backward."""
    import torch

    s, leaves = noop_router_graph(x, y, k)
    return common.median_ms(lambda: torch.autograd.grad(s, leaves, g, retain_graph=True),
                            args.warmup_ms, args.rep_ms) * 1e3


def _bench_impl(name, fn, case, sets, grads, ref_scores, args, common):
    """Check, then time, one implementation on one case; returns the row's measured fields."""
    import torch

    T, N, k = case
    is_triton = IMPLS[name][2]
    (x0, y0), g0 = sets[0], grads[0]

    def leaves(x, y):
        return x.detach().requires_grad_(), y.detach().requires_grad_()

    def forward_and_check(label, first=False):
        xl, yl = leaves(x0, y0)
        (s, i), t_fwd = common.first_call_s(lambda: fn(xl, yl, k))
        (dx, dy), t_bwd = common.first_call_s(
            lambda: torch.autograd.grad(s, (xl, yl), g0, retain_graph=True))
        problems = [f"{label}: {p}" for p in check(x0, y0, k, s, i, ref_scores, g0, dx, dy)]
        return problems, t_fwd, t_bwd

    problems, first_fwd, first_bwd = forward_and_check("first call")

    with torch.no_grad():
        fwd_ms = common.median_ms(common.cycling(lambda x, y: fn(x, y, k), sets), args.warmup_ms, args.rep_ms)

    graphs = []
    for (x, y), g in zip(sets, grads):
        xl, yl = leaves(x, y)
        graphs.append((fn(xl, yl, k)[0], (xl, yl), g))
    bwd_ms = common.median_ms(
        common.cycling(lambda s, xy, g: torch.autograd.grad(s, xy, g, retain_graph=True), graphs),
        args.warmup_ms, args.rep_ms)
    del graphs

    fwd_graph = bwd_graph = atomic_graph = engine = None
    if is_triton and torch.cuda.is_available() and fwd_ms < 1.0:
        # GPU time without the host: the forward call, and the backward kernel alone
        # (the same one for both Triton implementations) on the same gradients.
        from omni_moe.ops.router.backward import router_backward

        with torch.no_grad():
            fwd_graph = common.graph_us(lambda x, y: fn(x, y, k), sets)
            idx_sets = [(g, fn(x, y, k)[1]) for (x, y), g in zip(sets, grads)]
        bwd_graph = common.graph_us(lambda g, i: router_backward(g, i, N), idx_sets)
        atomic_graph = common.graph_us(lambda g, i: atomic_router_backward(g, i, N), idx_sets)
        del idx_sets
        engine = _engine_floor_us(x0, y0, k, g0, args, common)

    problems += forward_and_check("after timing")[0]
    return {
        "ok": not problems,
        "problems": problems,
        "fwd_us": fwd_ms * 1e3,
        "bwd_us": bwd_ms * 1e3,
        "fwd_graph_us": fwd_graph,
        "bwd_kernel_graph_us": bwd_graph,
        "atomic_bwd_graph_us": atomic_graph,
        "autograd_engine_us": engine,
        "first_fwd_s": first_fwd if is_triton else None,
        "first_bwd_s": first_bwd if is_triton else None,
    }


COLUMNS = [
    ("T", "T", "d"), ("N", "N", "d"), ("k", "k", "d"), ("dtype", "dtype", "s"), ("impl", "impl", "s"),
    ("ok", "ok", "ok"),
    ("fwd us", "fwd_us", ".1f"), ("bwd us", "bwd_us", ".1f"),
    ("fwd graph us", "fwd_graph_us", ".1f"), ("bwd kernel graph us", "bwd_kernel_graph_us", ".1f"),
    ("atomic bwd graph us", "atomic_bwd_graph_us", ".1f"),
    ("autograd engine us", "autograd_engine_us", ".1f"),
    ("fwd x orig", "fwd_speedup", ".2f"), ("bwd x orig", "bwd_speedup", ".2f"),
    ("floor us", "floor_us", ".3g"),
    ("fwd floor/time", "fwd_floor_frac", ".3g"), ("bwd floor/time", "bwd_floor_frac", ".3g"),
    ("first fwd s", "first_fwd_s", ".2f"), ("first bwd s", "first_bwd_s", ".2f"),
]


# Columns that mean something only on a GPU: graph replays, first calls (compilation of
# Triton kernels), the original kernel as baseline (Triton) and the HBM floor.
GPU_ONLY = {"fwd_graph_us", "bwd_kernel_graph_us", "atomic_bwd_graph_us", "autograd_engine_us",
            "fwd_speedup", "bwd_speedup",
            "floor_us", "fwd_floor_frac", "bwd_floor_frac", "first_fwd_s", "first_bwd_s"}


def _cell(row, key, fmt):
    v = row.get(key)
    if fmt == "ok":
        return "-" if v is None else ("yes" if v else "NO")
    if v is None:
        return "-"
    return format(v, fmt) if fmt != "s" else str(v)


def format_table(rows, gpu: bool = True) -> str:
    """Markdown table of the rows (without the GPU-only columns unless ``gpu``)."""
    cols = [c for c in COLUMNS if gpu or c[1] not in GPU_ONLY]
    head = "| " + " | ".join(c[0] for c in cols) + " |"
    align = "|" + "|".join("---" if c[2] in ("s", "ok") else "---:" for c in cols) + "|"
    body = ["| " + " | ".join(_cell(r, key, fmt) for _, key, fmt in cols) + " |" for r in rows]
    return "\n".join([head, align, *body])


def plot(rows, path, title, floors_too: bool = True):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["T"], r["N"], r["k"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows if r.get("fwd_us") is not None))
    by = {(r["T"], r["N"], r["k"], r["impl"]): r for r in rows}
    floors = {(r["T"], r["N"], r["k"]): r["floor_us"] for r in rows}
    width = 0.8 / max(1, len(impls))
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.2 * len(cases)), 8), sharex=True)
    for ax, key, label in ((axes[0], "fwd_us", "forward"), (axes[1], "bwd_us", "backward")):
        for j, impl in enumerate(impls):
            vals = [(by.get((*c, impl)) or {}).get(key) or math.nan for c in cases]
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(cases))]
            ax.bar(xs, vals, width, label=impl)
        for i, c in enumerate(cases if floors_too else ()):
            ax.hlines(floors[c], i - 0.45, i + 0.45, colors="k", linestyles="dashed",
                      label="HBM floor" if i == 0 else None)
        ax.set_yscale("log")
        ax.set_ylabel(f"{label}, µs (median)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small", ncol=min(5, len(impls) + 1))
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels([f"T={T}\nN={N} k={k}" for T, N, k in cases], fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(result, plot_path=None) -> None:
    """Print the table of a result (fresh or loaded from --json); draw it if asked."""
    env, st = result["env"], result["settings"]
    gpu = result["mode"] == "cuda"
    where = env["gpu"] or f"CPU ({result['mode']})"
    lines = [f"omni router, {st['dtype']}, {where}, torch {env['torch']}, triton {env['triton']}, "
             f"{env['date']}; times are medians"
             + (f"; x orig = original time / this time; floor = HBM bytes at {st['hbm_tbps']:g} TB/s"
                if gpu else "; CPU wall times of the PyTorch paths"),
             format_table(result["rows"], gpu)]
    for r in result["rows"]:
        for text in ([r["note"]] if r.get("note") else []) + (r.get("problems") or []):
            lines.append(f"  T={r['T']} N={r['N']} k={r['k']} {r['impl']}: {text}")
    # Built whole before printing: a malformed saved file fails before any output.
    print("\n".join(lines), flush=True)
    if plot_path:
        plot(result["rows"], plot_path, f"omni router, {st['dtype']}, {where}, {env['date'][:10]}", gpu)
        print(f"wrote {plot_path}")


def _looks_like_router_run(data) -> bool:
    return (data.get("benchmark") == "router" and isinstance(data.get("env"), dict)
            and isinstance(data.get("settings"), dict) and "mode" in data
            and all({"T", "N", "k", "impl"} <= r.keys() for r in data["rows"]))


def run(args) -> int:
    import torch

    from omni_moe.ops._dispatch import interpret_mode
    from omni_moe.ops.router.reference import router_bruteforce, router_pruned

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    common.check_run_arguments(args)
    if common.report_saved(args, "router", _looks_like_router_run, _report):
        return 0

    cuda = common.has_cuda()
    interp = interpret_mode()
    mode = "cuda" if cuda else ("cpu-interpret" if interp else "cpu")
    device = "cuda" if cuda else "cpu"
    dtype = common.TORCH_DTYPES[args.dtype]
    b = dtype.itemsize
    cases = args.cases or (DEFAULT_CASES if cuda else CPU_CASES)
    impls = [n for n in args.impls if not (args.skip_original and n == "original")]
    notes = []
    if not cuda:
        notes.append(
            "NO CUDA DEVICE: timings are CPU wall times of small cases, not GPU numbers. "
            + ("Triton implementations run through Triton's interpreter (TRITON_INTERPRET=1): "
               "their correctness is checked, their times mean nothing."
               if interp else
               "Triton implementations are skipped (they need CUDA, or TRITON_INTERPRET=1 "
               "to run through the interpreter).")
        )
    skipped = {}
    loaded = {}
    failures = 0
    for name in impls:
        if IMPLS[name][2] and not (cuda or interp):
            skipped[name] = "Triton implementation: needs CUDA or TRITON_INTERPRET=1"
            continue
        try:
            fn, why = _load(name)
        except Exception as e:  # noqa: BLE001 - a module that exists but is broken
            fn, why = None, f"import failed: {type(e).__name__}: {e}"
            failures += 1
        if fn is None:
            skipped[name] = why
        else:
            loaded[name] = fn
    for name, why in skipped.items():
        notes.append(f"{name} skipped: {why}")

    rotate_bytes = (int(args.rotate_mb * 2**20) if args.rotate_mb is not None
                    else 2 * common.l2_bytes())
    settings = {
        "dtype": args.dtype, "device": device, "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
        "hbm_tbps": args.hbm_tbps, "rotate_bytes": rotate_bytes, "brute_max_gib": args.brute_max_gib,
        "fresh_triton_cache": cuda and not args.reuse_triton_cache,
        "timer": ("median of CUDA-event timed calls, L2 flushed before each" if cuda
                  else "time.perf_counter median (CPU)"),
        "min_samples": common.MIN_SAMPLES,
        "forward": "the call under torch.no_grad()",
        "backward": "torch.autograd.grad(scores, (x, y), g, retain_graph=True) on a prebuilt graph",
    }
    result = {"benchmark": "router", "mode": mode, "env": common.environment(), "settings": settings,
              "notes": notes, "skipped": skipped, "rows": []}

    def save():
        if args.json:
            d = os.path.dirname(os.path.abspath(args.json))
            os.makedirs(d, exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    for n in notes:
        print("note: " + n, flush=True)

    cache_dir, saved_cache_env = None, os.environ.get("TRITON_CACHE_DIR")
    if settings["fresh_triton_cache"]:
        cache_dir = tempfile.mkdtemp(prefix="omni-moe-triton-cache-")
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    try:
        if cuda and loaded.keys() & {"original", "optimized"}:
            common.warm_up_triton()
        rows = result["rows"]
        for ci, case in enumerate(cases):
            T, N, k = case
            floor_us = (2 * T * N * b + T * k * (b + 4)) / (args.hbm_tbps * 1e12) * 1e6
            n_sets = common.num_sets(2 * T * N * b, rotate_bytes)
            log(f"[{ci + 1}/{len(cases)}] T={T} N={N} k={k} {args.dtype}: {n_sets} input set(s)")
            torch.manual_seed(args.seed)
            sets = [(torch.randn(T, N, device=device).to(dtype), torch.randn(T, N, device=device).to(dtype))
                    for _ in range(n_sets)]
            grads = [torch.randn(T, k, device=device).to(dtype) for _ in range(n_sets)]
            brute_bytes = T * N * N * 4
            oracle = router_bruteforce if brute_bytes <= BRUTE_ORACLE_MAX_BYTES else router_pruned
            with torch.no_grad():
                ref_scores = oracle(*sets[0], k)[0]
            case_rows = []
            for name, fn in loaded.items():
                row = {"T": T, "N": N, "k": k, "dtype": args.dtype, "impl": name, "ok": None,
                       "floor_us": floor_us, "n_sets": n_sets, "note": None}
                if name == "torch_brute" and brute_bytes >= args.brute_max_gib * 2**30:
                    row["note"] = (f"skipped: T*N*N*4 = {brute_bytes / 2**30:.3g} GiB "
                                   f">= --brute-max-gib {args.brute_max_gib:g}")
                elif IMPLS[name][2] and not cuda and T * N * N > INTERPRET_MAX_PAIRS:
                    row["note"] = f"skipped under the interpreter: T*N*N > {INTERPRET_MAX_PAIRS}"
                else:
                    try:
                        row.update(_bench_impl(name, fn, case, sets, grads, ref_scores, args, common))
                    except torch.cuda.OutOfMemoryError as e:
                        row["note"] = f"skipped: out of memory ({str(e).splitlines()[0]})"
                    except Exception as e:  # noqa: BLE001 - report and go on with the others
                        row.update(ok=False, problems=[f"{type(e).__name__}: {e}"])
                    if cuda:
                        torch.cuda.empty_cache()
                if row["ok"] is False:
                    failures += 1
                for key in ("fwd", "bwd"):
                    t = row.get(f"{key}_us")
                    row[f"{key}_floor_frac"] = floor_us / t if t else None
                case_rows.append(row)
                msg = (f"    {name:13s} ok={_cell(row, 'ok', 'ok'):3s} fwd {_cell(row, 'fwd_us', '.1f')} us"
                       f"  bwd {_cell(row, 'bwd_us', '.1f')} us  first {_cell(row, 'first_fwd_s', '.2f')} s")
                if row.get("note"):
                    msg += "  " + row["note"]
                for p in row.get("problems") or []:
                    msg += "\n      problem: " + p
                log(msg)
            orig = next((r for r in case_rows if r["impl"] == "original"), {})
            for r in case_rows:
                for key in ("fwd", "bwd"):
                    t, t0 = r.get(f"{key}_us"), orig.get(f"{key}_us")
                    r[f"{key}_speedup"] = t0 / t if t and t0 else None
            rows.extend(case_rows)
            del sets, grads
            save()
    finally:
        if cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
            if saved_cache_env is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved_cache_env

    save()
    if args.json:
        print(f"wrote {args.json}")
    _report(result, args.plot)
    if failures:
        print(f"FAILED: {failures} implementation/case(s) did not meet the contract (see 'problem' lines)",
              file=sys.stderr)
        return 1
    return 0
