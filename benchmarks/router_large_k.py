"""Check, then time, the router past the fast path (large k) and its backward, on a GPU.

    PYTHONPATH=. python benchmarks/router_large_k.py --json OUT.json [--budget-s 150]

Every forward variant is first checked at T = 64, N = 320 against brute force (scores
equal its top-k values; indices in range, distinct and consistent; the unsorted call
returns the sorted call's pairs), every backward against the reference within the
float32 accumulation bound; a failure is reported and the exit status is 1.  Then it is
timed: GPU time from CUDA-graph replay of 20+ calls over log-softmax input sets larger
than 2x L2 (median).  "first s" = the first call's seconds at the timed size (the
compilation is mostly paid by the check before it); "peak MiB" = peak CUDA memory of
one forward call above what was allocated before it (outputs included).

Groups, in priority order (measurements not started by --budget-s seconds are listed as
skipped; a rerun reuses Triton's cache, so it spends its budget on timing):
1. T = 4096, N = 320, k in K_LIST: the launch rule ("rule": the fast path below
   ``pruned.LARGE_K_MIN_K``, the large-k kernel from it), sorted and unsorted; backward:
   the rule's, the sort kernel, the fixed-point kernel with and without run sums, the
   atomic peer (``omni_moe.bench.router.atomic_router_backward``);
2. the same at T = 16384;
3. the k <= 32 cases of ``omni-moe bench router`` (fast path and dense backward: a
   regression check) with the atomic peer beside them;
4. T = 4096, k up to the fast path's end: the large-k kernel and the warp kernel, each
   forced (the crossover behind ``pruned.LARGE_K_MIN_K``), and the dense backward at
   k <= 1024;
5. T = 4096, k in VARIANT_KS: every LargeKConfig variant (programs per SM, warps, the
   three sorts, emission width) and the backward kernels' launch variants, beside the
   rule's own configuration ("large_k", backward "rule"; timed here unless group 1 timed
   it in the same run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace

import torch

from omni_moe.bench.common import cycling, environment, graph_us, l2_bytes, median_ms, num_sets
from omni_moe.bench.router import DEFAULT_CASES, atomic_router_backward
from omni_moe.ops.router import large_k as lk
from omni_moe.ops.router import pruned
from omni_moe.ops.router.backward import FixedBackwardConfig, SortBackwardConfig, router_backward
from omni_moe.ops.router.backward import default_config as backward_rule
from omni_moe.ops.router.reference import ordered_key, router_backward_reference, router_bruteforce

N = 320
K_LIST = [32, 64, 128, 256, 320, 512, 1024, 2048, 4096]
T_LIST = [4096, 16384]
VARIANT_KS = [512, 4096]
CHECK_T = 64
DEV = "cuda"


def dry_run_sizes():
    """--dry-run: tiny sizes on the CPU through Triton's interpreter, to check the script
    itself without a GPU (timings meaningless)."""
    global N, K_LIST, T_LIST, VARIANT_KS, CHECK_T, DEV, DEFAULT_CASES
    N, K_LIST, T_LIST, VARIANT_KS, CHECK_T, DEV = 12, [8, 40], [16], [40], 8, "cpu"
    DEFAULT_CASES = [(16, 8, 4)]


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def gpu_us(fn, argsets):
    """GPU time of one call from CUDA-graph replay; on the CPU (dry run) a plain median."""
    if DEV == "cuda":
        return graph_us(fn, argsets)
    return median_ms(cycling(fn, argsets), 1, 1, 2) * 1e3


def variants(T, k, sorted_):
    """(name, LargeKConfig): the large-k rule for this shape, then its neighbours (each
    new constexpr set is one more compilation: tile_t > 1 and first_probe=False are left
    to hand runs, ptxas gives tile_t = 2 twice the registers)."""
    base = lk.default_config(T, N, k, 9, sorted_)
    out = [("large_k", base), ("progs2", replace(base, progs_per_sm=2)),
           ("progs8", replace(base, progs_per_sm=8)), ("warps8", replace(base, warps=8))]
    if sorted_:
        for s in ("fused", "split", "torch"):
            if s != base.sort:
                # A fused sort of 2048+ slots needs 8 warps (4 spill).
                w = 8 if s == "fused" and lk._pow2(k) >= 2048 else base.warps
                out.append((f"sort_{s}", replace(base, sort=s, warps=w)))
    else:
        out.append(("emit2048", replace(base, emit_block=2048)))
    return out


def forward_fn(k, sorted_, cfg):
    return lambda x, y: pruned.pruned_router_forward(x, y, k, sorted=sorted_, config=cfg)


def path_of(T, k, cfg):
    if cfg is not None:
        return "large_k" if isinstance(cfg, lk.LargeKConfig) else type(cfg).__name__
    rule = pruned.default_config(T, N, k)
    return type(rule).__name__ if rule is not None else "torch"


def make_sets(T, dtype, count, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    # Log-softmax rows: what the layer's router receives.
    return [(torch.randn(T, N, device=DEV, generator=g).log_softmax(-1).to(dtype),
             torch.randn(T, N, device=DEV, generator=g).log_softmax(-1).to(dtype)) for _ in range(count)]


def check_forward(x, y, k, s, i, ref, sorted_, sorted_idx=None):
    """Problems (strings) of one forward output against brute force's top-k values."""
    probs = []
    idx = i.long()
    if bool(((idx < 0) | (idx >= N * N)).any()):
        return ["index out of range"]
    srt = idx.sort(dim=1).values
    if k > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
        probs.append("duplicate index")
    rec = (x.float().gather(1, idx // N) + y.float().gather(1, idx % N)).to(x.dtype)
    if not bool(((rec == s) | (rec.isnan() & s.isnan())).all()):
        probs.append("a score does not match its index")
    got = s
    if not sorted_:
        got = s.float().gather(1, ordered_key(s.float()).argsort(dim=1, descending=True, stable=True)).to(x.dtype)
        if sorted_idx is not None and not torch.equal(srt, sorted_idx.long().sort(dim=1).values):
            probs.append("unsorted pairs differ from the sorted call's")
    if not bool(((got == ref) | (got.isnan() & ref.isnan())).all()):
        probs.append("scores differ from brute force")
    return probs


def check_backward(g, i, dx, dy):
    rx, ry = router_backward_reference(g.float(), i, N)  # float32 reference sums
    probs = []
    k = i.shape[1]
    for name, got, ref in (("dx", dx, rx), ("dy", dy, ry)):
        # float32 sums of at most k terms in another order, then one rounding.
        absum = router_backward_reference(g.float().abs(), i, N)[0 if name == "dx" else 1]
        tol = k * 2.0**-24 * absum + got.float().abs() * {torch.bfloat16: 2**-8, torch.float16: 2**-11,
                                                          torch.float32: 2**-24}[got.dtype]
        if not bool(((got.float() - ref).abs() <= tol + 1e-30).all()):
            probs.append(f"{name} outside the bound")
    return probs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write rows and environment here")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="start no new measurement after this many seconds (default 150)")
    p.add_argument("--groups", default="1,2,3,4,5", help="groups to run, comma-separated (default all)")
    p.add_argument("--ks", default=None, help="k values of groups 1, 2 and 4 (default %s)" % ",".join(map(str, K_LIST)))
    p.add_argument("--variant-ks", default=None,
                   help="k values of group 5 (default %s)" % ",".join(map(str, VARIANT_KS)))
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU (needs TRITON_INTERPRET=1): checks the script, times nothing")
    args = p.parse_args()
    if args.dry_run:
        dry_run_sizes()
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --dry-run with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    try:
        groups = {int(v) for v in args.groups.split(",")}
        ks = [int(v) for v in args.ks.split(",")] if args.ks else K_LIST
        variant_ks = [int(v) for v in args.variant_ks.split(",")] if args.variant_ks else VARIANT_KS
    except ValueError:
        print("--groups, --ks and --variant-ks take comma-separated integers", file=sys.stderr)
        return 2
    if not groups <= {1, 2, 3, 4, 5} or min(ks + variant_ks) < 1:
        print("--groups are 1..5; every k must be >= 1", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    b = dtype.itemsize
    l2 = 2 * l2_bytes() if DEV == "cuda" else 0
    t_start = time.time()
    result = {"benchmark": "router_large_k", "env": environment(), "dtype": args.dtype, "N": N,
              "check": [], "forward": [], "backward": [], "skipped": []}
    failures = []

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=str)

    def over_budget(what):
        if time.time() - t_start > args.budget_s:
            result["skipped"].append(what)
            return True
        return False

    (cx, cy), = make_sets(CHECK_T, dtype, 1, seed=1)
    refs, checked = {}, set()

    def check_fwd(k, name, sorted_, cfg):
        # The timed configuration itself (the rule's for the timed T), so that the check
        # compiles exactly the kernels the timing runs.
        if (k, sorted_, cfg) in checked:
            return
        checked.add((k, sorted_, cfg))
        if k not in refs:
            refs[k] = router_bruteforce(cx, cy, k)[0]
        t0 = time.time()
        with torch.no_grad():
            s, i = pruned.pruned_router_forward(cx, cy, k, sorted=True, config=cfg)
            if sorted_:
                probs = check_forward(cx, cy, k, s, i, refs[k], True)
            else:
                us, ui = pruned.pruned_router_forward(cx, cy, k, sorted=False, config=cfg)
                probs = check_forward(cx, cy, k, us, ui, refs[k], False, i)
        sync()
        result["check"].append({"k": k, "variant": name, "sorted": sorted_, "ok": not probs,
                                "problems": probs, "first_calls_s": time.time() - t0})
        if probs:
            failures.append(f"forward k={k} {name} sorted={sorted_}: " + "; ".join(probs))
            print("CHECK FAILED: " + failures[-1], flush=True)

    def time_forward(T, k, sorted_, name, cfg, sets):
        if over_budget(f"forward T={T} k={k} sorted={sorted_} {name}"):
            return
        check_fwd(k, name, sorted_, cfg if cfg is not None else pruned.default_config(T, N, k))
        fn = forward_fn(k, sorted_, cfg)
        t0 = time.time()
        with torch.no_grad():
            fn(*sets[0])
        sync()
        first = time.time() - t0
        peak = None
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with torch.no_grad():
            out = fn(*sets[0])
        sync()
        if DEV == "cuda":
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        del out
        with torch.no_grad():
            us = gpu_us(fn, sets)
        row = {"T": T, "k": k, "sorted": sorted_, "variant": name, "path": path_of(T, k, cfg),
               "config": asdict(cfg) if cfg is not None else None, "fwd_graph_us": us,
               "first_s": first, "peak_mib": peak}
        result["forward"].append(row)
        print(f"fwd T={T:5d} k={k:5d} {'sorted' if sorted_ else 'unsorted':8s} {name:15s} "
              f"{row['path']:12s} {us:9.1f} us  first {first:5.1f} s  peak {peak or 0:7.1f} MiB", flush=True)

    def backward_fns(k):
        sort_cfg = SortBackwardConfig(warps=8 if k >= 2048 else 4)
        fixed = FixedBackwardConfig()
        return {"rule": lambda g, i: router_backward(g, i, N),
                "fixed": lambda g, i: router_backward(g, i, N, config=fixed),
                "fixed_runs": lambda g, i: router_backward(g, i, N, config=replace(fixed, runs=True)),
                "fixed_b2048w8": lambda g, i: router_backward(g, i, N, config=replace(fixed, block=2048, warps=8)),
                "fixed_b512": lambda g, i: router_backward(g, i, N, config=replace(fixed, block=512)),
                "fixed_p16": lambda g, i: router_backward(g, i, N, config=replace(fixed, progs_per_sm=16)),
                "fixed_t4": lambda g, i: router_backward(g, i, N, config=replace(fixed, tile_t=4, block=256)),
                "dense": lambda g, i: router_backward(g, i, N, config=backward_rule(N, 1)),
                "sort": lambda g, i: router_backward(g, i, N, config=sort_cfg),
                "sort_b1024": lambda g, i: router_backward(g, i, N, config=replace(sort_cfg, block=1024)),
                "atomic": lambda g, i: atomic_router_backward(g, i, N)}

    def time_backward(T, k, names, idx_sets):
        fns = backward_fns(k)
        g_sets = [(torch.randn(T, k, device=DEV).to(dtype), i) for i in idx_sets]
        for name in names:
            if over_budget(f"backward T={T} k={k} {name}"):
                continue
            if ("bwd", k, name) not in checked:
                checked.add(("bwd", k, name))
                with torch.no_grad():
                    ci = pruned.pruned_router_forward(cx, cy, k, sorted=False)[1]
                cg = torch.randn(CHECK_T, k, device=DEV).to(dtype)
                probs = check_backward(cg, ci, *fns[name](cg, ci))
                result["check"].append({"k": k, "backward": name, "ok": not probs, "problems": probs})
                if probs:
                    failures.append(f"backward k={k} {name}: " + "; ".join(probs))
                    print("CHECK FAILED: " + failures[-1], flush=True)
            rule = type(backward_rule(N, k)).__name__ if name == "rule" else None
            us = gpu_us(fns[name], g_sets)
            result["backward"].append({"T": T, "k": k, "bwd": name, "rule": rule, "graph_us": us})
            print(f"bwd T={T:5d} k={k:5d} {name:10s} {rule or '':20s} {us:9.1f} us", flush=True)

    def shape_sets(T, k):
        return make_sets(T, dtype, num_sets(2 * T * N * b, l2), seed=T + k)

    def unsorted_indices(sets, k):
        with torch.no_grad():
            return [pruned.pruned_router_forward(xx, yy, k, sorted=False)[1] for xx, yy in sets]

    # 1, 2: the rule at the paper's sizes.
    for T in [t for g, t in zip((1, 2), T_LIST) if g in groups]:
        for k in ks:
            sets = shape_sets(T, k)
            for sorted_ in (True, False):
                time_forward(T, k, sorted_, "rule", None, sets)
            time_backward(T, k, ("rule", "sort", "fixed", "fixed_runs", "atomic"), unsorted_indices(sets, k))
            del sets
            if DEV == "cuda":
                torch.cuda.empty_cache()
            save()
    # 3: the k <= 32 cases of the router table.
    for T, n, k in DEFAULT_CASES if 3 in groups else ():
        if k > 32 or over_budget(f"table T={T} N={n} k={k}"):
            continue
        g = torch.Generator(device=DEV).manual_seed(0)
        sets = [(torch.randn(T, n, device=DEV, generator=g).to(dtype),
                 torch.randn(T, n, device=DEV, generator=g).to(dtype))
                for _ in range(num_sets(2 * T * n * b, l2))]
        with torch.no_grad():
            us = gpu_us(lambda xx, yy: pruned.pruned_router_forward(xx, yy, k), sets)
            idx = [(torch.randn(T, k, device=DEV).to(dtype), pruned.pruned_router_forward(xx, yy, k)[1])
                   for xx, yy in sets]
        bus = gpu_us(lambda gg, ii: router_backward(gg, ii, n), idx)
        aus = gpu_us(lambda gg, ii: atomic_router_backward(gg, ii, n), idx)
        result["forward"].append({"T": T, "N": n, "k": k, "sorted": True, "variant": "table",
                                  "fwd_graph_us": us, "bwd_graph_us": bus, "atomic_bwd_graph_us": aus})
        print(f"table T={T:5d} N={n:4d} k={k:3d} fwd {us:7.1f} us  bwd {bus:7.1f} us  atomic {aus:7.1f} us",
              flush=True)
        del sets, idx
    save()
    # 4: the large-k and warp kernels forced on either side of the rule's boundary; the
    # dense backward up to k = 1024.
    T = T_LIST[0]
    for k in ks if 4 in groups else ():
        sets = shape_sets(T, k)
        if k <= pruned.MAX_FAST_K:
            for sorted_ in (True, False):
                time_forward(T, k, sorted_, "large_k", lk.default_config(T, N, k, 9, sorted_), sets)
                time_forward(T, k, sorted_, "warp", pruned.default_config(T, N, k, kernel="warp"), sets)
        if k <= 1024:
            time_backward(T, k, ("dense",), unsorted_indices(sets, k))
        del sets
        if DEV == "cuda":
            torch.cuda.empty_cache()
        save()
    # 5: the launch variants.
    for k in variant_ks if 5 in groups else ():
        sets = shape_sets(T, k)
        # The variants compare with the rule's own configuration timed in the same run:
        # here, unless group 1 timed it already.
        timed = {(r["T"], r["k"], r["sorted"]) for r in result["forward"]
                 if r.get("variant") in ("rule", "large_k")}
        for sorted_ in (True, False):
            for name, cfg in variants(T, k, sorted_):
                if name != "large_k" or (T, k, sorted_) not in timed:
                    time_forward(T, k, sorted_, name, cfg, sets)
        names = ("sort_b1024", "fixed_b2048w8", "fixed_b512", "fixed_p16", "fixed_t4")
        if not any((r["T"], r["k"], r["bwd"]) == (T, k, "rule") for r in result["backward"]):
            names = ("rule",) + names
        time_backward(T, k, names, unsorted_indices(sets, k))
        del sets
        if DEV == "cuda":
            torch.cuda.empty_cache()
        save()

    # ----------------------------------------------------------------- report
    print(f"\nomni router past the fast path, N = {N}, {args.dtype}, {result['env'].get('gpu')}, "
          f"{result['env'].get('date')}: forward GPU time (us, CUDA graph)")
    print("| T | k | rule sorted | rule unsorted | large_k sorted | large_k unsorted | warp sorted "
          "| warp unsorted | peak MiB (rule, sorted) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    by = {(r["T"], r["k"], r["sorted"], r["variant"]): r for r in result["forward"] if "N" not in r}
    for T in T_LIST:
        for k in ks:
            cells = [by.get((T, k, s, v), {}).get("fwd_graph_us") for v in ("rule", "large_k", "warp")
                     for s in (True, False)]
            if all(c is None for c in cells):
                continue
            peak = by.get((T, k, True, "rule"), {}).get("peak_mib")
            print(f"| {T} | {k} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells)
                  + f" | {'-' if peak is None else f'{peak:.0f}'} |")
    print("\nbackward GPU time (us, CUDA graph; indices of the unsorted forward)")
    names = ("rule", "dense", "sort", "sort_b1024", "fixed", "fixed_runs", "fixed_b2048w8", "fixed_b512",
             "fixed_p16", "fixed_t4", "atomic")
    print("| T | k | " + " | ".join(names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    bb = {(r["T"], r["k"], r["bwd"]): r["graph_us"] for r in result["backward"]}
    for T in T_LIST:
        for k in sorted(set(ks) | set(variant_ks)):
            cells = [bb.get((T, k, n)) for n in names]
            if all(c is None for c in cells):
                continue
            print(f"| {T} | {k} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    print(f"\nvariants (T = {T_LIST[0]}): " + "; ".join(
        f"k={r['k']} {'s' if r['sorted'] else 'u'} {r['variant']} {r['fwd_graph_us']:.1f}"
        for r in result["forward"] if r.get("variant") not in ("rule", "warp", "table")
        and (r.get("variant") != "large_k" or r["k"] in variant_ks)))
    if result["skipped"]:
        print(f"\nskipped past the {args.budget_s:g} s budget: " + "; ".join(result["skipped"]))
    for f in failures:
        print("FAILED: " + f, file=sys.stderr)
    save()
    if args.json:
        print(f"wrote {args.json}")
    print(f"total {time.time() - t_start:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
