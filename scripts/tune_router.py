"""Check, then time, variants of the pruned router on one GPU (one device call).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python scripts/tune_router.py --out $OUT [--plan NAME]

1. warm-up: every (case, config) is compiled by a pool of worker processes sharing one
   Triton cache; each records its first-call time (compile + run, under the contention
   of the pool);
2. correctness: every (case, config) on fresh random inputs of several kinds (randn,
   ties, masked, NaN, strided halves) against the PyTorch pruned reference on the GPU
   (scores exactly equal, indices valid, distinct and consistent with the scores);
   extra shapes (float32, float16, odd N, odd k, k > N, the fallback path);
3. timing: triton.testing.do_bench median over rotating input sets (> 64 MB in all),
   and per-call time from a CUDA graph of many calls over the same rotating sets;
4. backward: check against the CPU reference, time the same way;
5. baselines: PyTorch pruned reference and (small T) the full-scan router.

Writes <out>/tune.json and prints a compact table last.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import math
import os
import sys
import time

import torch

# Target cases of the optimized-router issue (bf16).
DEVICE = "cuda"
TARGETS = [
    (1024, 64, 16), (1024, 64, 32), (1024, 128, 16), (1024, 128, 32),
    (1024, 256, 16), (1024, 256, 32), (16384, 256, 16), (65536, 256, 16),
    (4096, 1024, 16),
]


def plan_configs(plan: str, T: int, N: int, k: int):
    """(name, config overrides, stage) to try for one case."""
    from omni_moe.triton.omni_router_optimized import default_config

    d = default_config(T, N, k, torch.bfloat16)
    out = [("default", {}, 2)]
    if plan == "quick":
        return out
    if plan == "regs":
        # Register caps and CTA shapes for the three large cases (T >= 4096).
        if d["kernel"] == "stream":
            for lpt in (1, 2, 4):
                for reg in (0, 64, 80, 96):
                    for w in (2, 4):
                        cfg = {"lpt": lpt, "gsplit": lpt > 1, "warps": w}
                        if reg:
                            cfg["maxnreg"] = reg
                        out.append((f"lpt{lpt}_w{w}_r{reg}", cfg, 2))
        else:
            for tt, w in ((1, 1), (1, 2), (2, 2), (2, 4), (4, 4)):
                for reg in (0, 96, 128, 168):
                    cfg = {"tile_t": tt, "warps": w}
                    if reg:
                        cfg["maxnreg"] = reg
                    out.append((f"t{tt}w{w}_r{reg}", cfg, 2))
            out.append(("stream", {"kernel": "stream"}, 2))
            out.append(("stream_lpt16", {"kernel": "stream", "lpt": 16, "gsplit": True}, 2))
        return out
    if d["kernel"] == "stream":
        lpt = d["lpt"]
        g = {"gsplit": True}
        if T <= 4096 and N <= 256:
            out += [("gsplit", g, 2), ("w2_gsplit", {**g, "warps": 2}, 2),
                    ("w1_gsplit", {**g, "warps": 1}, 2)]
            if N in (64, 256):
                out.append(("axis_only", g, 1))
        elif T <= 4096:
            out += [("gsplit", g, 2), ("lpt16_gsplit", {**g, "lpt": 16}, 2),
                    ("lpt4_gsplit", {**g, "lpt": 4}, 2), ("w2_gsplit", {**g, "warps": 2}, 2),
                    ("axis_only", g, 1)]
        elif T <= 16384:
            out += [("gsplit", g, 2), ("lpt4_gsplit", {**g, "lpt": 4}, 2), ("lpt1", {"lpt": 1}, 2),
                    ("w2_gsplit", {**g, "warps": 2}, 2), ("reg128", {"maxnreg": 128}, 2)]
        else:
            out += [("lpt2_gsplit", {**g, "lpt": 2}, 2), ("lpt2", {"lpt": 2}, 2),
                    ("reg128", {"maxnreg": 128}, 2), ("lpt2_gsplit_w2", {**g, "lpt": 2, "warps": 2}, 2),
                    ("axis_only", {}, 1), ("axis_only_lpt2", {"lpt": 2}, 1)]
        return out
    out.append(("fullrow", {"thresh": False}, 2))
    out.append(("fullrow_lf", {"thresh": False, "lane_first": True}, 2))
    out.append(("t2w2", {"tile_t": 2, "warps": 2}, 2))
    out.append(("t2w2_fullrow", {"tile_t": 2, "warps": 2, "thresh": False}, 2))
    out.append(("t1w1_fullrow", {"tile_t": 1, "warps": 1, "thresh": False}, 2))
    return out


EXTRA_CHECKS = [
    # (T, N, k, dtype)
    (4096, 1000, 16, torch.bfloat16), (3000, 17, 16, torch.float16), (2048, 256, 5, torch.float32),
    (65536, 64, 16, torch.bfloat16), (1000, 4096, 16, torch.bfloat16), (511, 1024, 32, torch.bfloat16),
    (1024, 256, 16, torch.float32), (1024, 256, 16, torch.float16),
    (1000, 100, 7, torch.bfloat16), (777, 1000, 32, torch.bfloat16),
    (512, 1024, 64, torch.bfloat16), (300, 8, 64, torch.bfloat16),
    (64, 64, 256, torch.bfloat16), (64, 16, 256, torch.float32), (33, 32, 1000, torch.bfloat16),
    (4096, 512, 16, torch.float32), (2048, 64, 1, torch.bfloat16), (257, 3, 9, torch.float16),
]


def make(T, N, dtype, kind, seed, device=None):
    device = device or DEVICE
    g = torch.Generator(device=device).manual_seed(seed)
    if kind == "halves":
        z = torch.randn(T, 2 * N, generator=g, device=device).to(dtype)
        return z[:, :N], z[:, N:]
    if kind == "transposed":
        x = torch.randn(N, T, generator=g, device=device).to(dtype).t()
        y = torch.randn(N, T, generator=g, device=device).to(dtype).t()
        return x, y
    x = torch.randn(T, N, generator=g, device=device)
    y = torch.randn(T, N, generator=g, device=device)
    if kind == "ties":
        x = torch.randint(-3, 3, (T, N), generator=g, device=device).float()
        y = torch.randint(-3, 3, (T, N), generator=g, device=device).float()
    elif kind == "masked":
        x[torch.rand(T, N, generator=g, device=device) < 0.5] = float("-inf")
        y[torch.rand(T, N, generator=g, device=device) < 0.3] = float("-inf")
        x[0] = float("-inf")
        y[min(2, T - 1)] = float("-inf")
    elif kind == "nan":
        x[torch.rand(T, N, generator=g, device=device) < 0.1] = float("nan")
        y[torch.rand(T, N, generator=g, device=device) < 0.1] = float("nan")
        x[min(1, T - 1)] = float("nan")
    return x.to(dtype), y.to(dtype)


def check(x, y, k, s, i):
    """Exactness on the GPU: values equal the reference's, indices valid/distinct/consistent."""
    from omni_moe.reference.router import router_pruned

    T, N = x.shape
    rs, _ = router_pruned(x, y, k)
    same = (s == rs) | (torch.isnan(s) & torch.isnan(rs))
    assert bool(same.all()), "scores differ from the reference"
    il = i.long()
    assert bool(((il >= 0) & (il < N * N)).all()), "index out of range"
    if k > 1:
        srt = il.sort(dim=1).values
        assert bool((srt[:, 1:] != srt[:, :-1]).all()), "duplicate index"
    rec = (x.float().gather(1, il // N) + y.float().gather(1, il % N)).to(x.dtype)
    assert bool(((rec == s) | (torch.isnan(rec) & torch.isnan(s))).all()), "score/index mismatch"


def run_fwd(x, y, k, cfg, stage):
    from omni_moe.triton.omni_router_optimized import pruned_router_forward

    return pruned_router_forward(x, y, k, config=cfg, stage=stage)


def _warm_one(job):
    """Worker: compile one (case, config) through the real launch path; time the first call.

    Strided inputs (halves, transposed views) specialize differently, so the checks'
    kinds are warmed too: the main process then never compiles."""
    T, N, k, dtype_name, cfg, stage = job[:6]
    kind = job[6] if len(job) > 6 else "randn"
    dtype = getattr(torch, dtype_name)
    x, y = make(T, N, dtype, kind, 0)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run_fwd(x, y, k, cfg, stage)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _init_worker(device):
    global DEVICE
    DEVICE = device
    if device == "cuda":
        torch.cuda.init()


def rotating_inputs(T, N, dtype, min_bytes=64 << 20, max_sets=256):
    per = 2 * T * N * torch.tensor([], dtype=dtype).element_size()
    n = max(2, min(max_sets, math.ceil(min_bytes / per)))
    g = torch.Generator(device=DEVICE).manual_seed(1234)
    return [(torch.randn(T, N, generator=g, device=DEVICE).to(dtype),
             torch.randn(T, N, generator=g, device=DEVICE).to(dtype)) for _ in range(n)]


def bench(fn, sets, reps_graph=None):
    """(do_bench median us with rotation, graph per-call us)."""
    import triton

    it = [0]

    def call():
        a, b = sets[it[0] % len(sets)]
        it[0] += 1
        fn(a, b)

    if DEVICE != "cuda":
        call()
        return float("nan"), "no GPU"
    med = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median") * 1e3
    # CUDA graph over all sets (a few times over): per-call device time without launch gaps.
    graph_us = None
    try:
        n = len(sets) * max(1, (reps_graph or 64) // len(sets))
        n = min(max(n, len(sets)), 512)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for j in range(len(sets)):
                fn(*sets[j])
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for j in range(n):
                fn(*sets[j % len(sets)])
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            g.replay()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) * 1e3 / n)
        graph_us = sorted(times)[len(times) // 2]
        del g
    except Exception as e:  # noqa: BLE001 - report, keep going
        graph_us = f"graph failed: {type(e).__name__}: {e}"[:200]
    return med, graph_us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--plan", default="full")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--budget", type=float, default=200.0, help="seconds; later steps skip")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpreter")
    ap.add_argument("--baselines", action="store_true", help="also time torch / full scan")
    ap.add_argument("--ncu", default=None, help="T,N,k[,json config]: just run that forward twice")
    args = ap.parse_args()
    global DEVICE, TARGETS, EXTRA_CHECKS
    if args.ncu:
        parts = args.ncu.split(",", 3)
        T, N, k = (int(v) for v in parts[:3])
        cfg = json.loads(parts[3]) if len(parts) > 3 else {}
        x, y = make(T, N, torch.bfloat16, "randn", 0)
        for _ in range(2):
            run_fwd(x, y, k, cfg, 2)
        torch.cuda.synchronize()
        return 0
    if args.smoke:
        DEVICE = "cpu"
        TARGETS = [(8, 64, 16), (4, 64, 32)]
        EXTRA_CHECKS = [(5, 100, 7, torch.float32), (3, 8, 64, torch.bfloat16)]
        args.workers = 2
    t_start = time.time()
    res = {
        "date": datetime.datetime.utcnow().isoformat() + "Z",
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__,
        "plan": args.plan,
    }
    import triton

    res["triton"] = triton.__version__
    print(f"# {res['device']} torch {res['torch']} triton {res['triton']} {res['date']}")

    if DEVICE == "cuda":
        for (T, N, k) in ((65536, 256, 16), (1024, 256, 32)):
            x, y = make(T, N, torch.bfloat16, "randn", 0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run_fwd(x, y, k, {}, 2)
            torch.cuda.synchronize()
            res.setdefault("cold_first_call_s", {})[str((T, N, k))] = time.perf_counter() - t0
        print("# cold first call (compile included):", res["cold_first_call_s"])
    if args.plan == "regs":
        TARGETS = [(16384, 256, 16), (65536, 256, 16), (4096, 1024, 16)]
        EXTRA_CHECKS = []
    jobs = []
    for (T, N, k) in TARGETS:
        for name, cfg, stage in plan_configs(args.plan, T, N, k):
            jobs.append(((T, N, k), name, cfg, stage))
    warm = [(T, N, k, "bfloat16", cfg, stage, kind) for (T, N, k), _, cfg, stage in jobs
            for kind in (("randn", "halves") if stage == 2 else ("randn",))]
    warm += [(T, N, k, str(dt).split(".")[1], {}, 2, kind) for (T, N, k, dt) in EXTRA_CHECKS
             for kind in ("randn", "halves", "transposed")]
    # Unique compiles only (progs_per_sm does not change the binary).
    seen, uniq = set(), []
    for w in warm:
        key = (w[0], w[1], w[2], w[3], w[5], w[6],
               tuple(sorted((a, b) for a, b in w[4].items() if a != "progs_per_sm")))
        if key not in seen:
            seen.add(key)
            uniq.append(w)
    t0 = time.time()
    first_call = {}
    ctx = torch.multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx, initializer=_init_worker, initargs=(DEVICE,)) as ex:
        futs = {ex.submit(_warm_one, w): w for w in uniq}
        for f in cf.as_completed(futs):
            w = futs[f]
            try:
                first_call[repr(w)] = f.result()
            except Exception as e:  # noqa: BLE001
                first_call[repr(w)] = f"ERROR {type(e).__name__}: {e}"[:300]
    res["warm_s"] = time.time() - t0
    res["first_call_s"] = first_call
    print(f"# warm-up: {len(uniq)} compiles in {res['warm_s']:.1f}s; "
          f"max first call {max([v for v in first_call.values() if isinstance(v, float)] or [0]):.2f}s")
    errs = {k_: v for k_, v in first_call.items() if not isinstance(v, float)}
    if errs:
        print("# compile errors:", json.dumps(errs, indent=1)[:3000])
    bad = {(w[0], w[1], w[2], w[5], json.dumps(w[4], sort_keys=True)) for w in uniq
           if not isinstance(first_call.get(repr(w)), float)}
    sys.stdout.flush()

    def is_bad(T, N, k, cfg, stage):
        return (T, N, k, stage, json.dumps(cfg, sort_keys=True)) in bad

    # Correctness of every variant (stage-2 ones) + extra shapes.
    failures = []
    n_checked = 0
    for (T, N, k), name, cfg, stage in jobs:
        if stage != 2 or is_bad(T, N, k, cfg, stage):
            continue
        for si, kind in enumerate(("randn", "ties", "masked", "nan", "halves")):
            x, y = make(T, N, torch.bfloat16, kind, 100 + si + T + N + k)
            try:
                s = torch.full((T, k), float("nan"), dtype=x.dtype, device=DEVICE)
                i = torch.full((T, k), -1, dtype=torch.int32, device=DEVICE)
                from omni_moe.triton.omni_router_optimized import pruned_router_forward

                pruned_router_forward(x, y, k, s, i, config=cfg)
                check(x, y, k, s, i)
                n_checked += 1
            except Exception as e:  # noqa: BLE001
                failures.append(f"{(T, N, k)} {name} {kind}: {type(e).__name__}: {e}"[:300])
    for (T, N, k, dt) in EXTRA_CHECKS:
        if is_bad(T, N, k, {}, 2):
            failures.append(f"{(T, N, k, dt)}: compile failed")
            continue
        for si, kind in enumerate(("randn", "ties", "masked", "nan", "halves", "transposed")):
            x, y = make(T, N, dt, kind, 7 + si)
            try:
                s, i = run_fwd(x, y, k, {}, 2)
                check(x, y, k, s, i)
                # Determinism: a second run is bitwise identical.
                s2, i2 = run_fwd(x, y, k, {}, 2)
                assert torch.equal(i, i2) and bool(((s == s2) | (torch.isnan(s) & torch.isnan(s2))).all())
                n_checked += 1
            except Exception as e:  # noqa: BLE001
                failures.append(f"{(T, N, k, dt)} {kind}: {type(e).__name__}: {e}"[:300])
    res["checked"] = n_checked
    res["failures"] = failures
    sys.stdout.flush()
    print(f"# correctness: {n_checked} runs checked, {len(failures)} failures")
    for f_ in failures[:20]:
        print("#  FAIL", f_)

    # Timing.
    timings = []
    by_case = {}
    for (T, N, k), name, cfg, stage in jobs:
        by_case.setdefault((T, N, k), []).append((name, cfg, stage))
    for (T, N, k), variants in by_case.items():
        if time.time() - t_start > args.budget:
            print("# budget exhausted, skipping timing of", (T, N, k))
            continue
        sets = rotating_inputs(T, N, torch.bfloat16)
        for name, cfg, stage in variants:
            if is_bad(T, N, k, cfg, stage):
                continue

            def fn(a, b, cfg=cfg, stage=stage):
                return run_fwd(a, b, k, cfg, stage)

            med, gus = bench(fn, sets)
            timings.append(dict(T=T, N=N, k=k, variant=name, cfg=cfg, stage=stage,
                                do_bench_us=med, graph_us=gus))
            # partial results survive a timeout
            print(f"#  {T} {N} {k} {name}: {med:.1f} us / graph {gus}", flush=True)
        del sets
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    res["forward"] = timings

    # Backward: check + time.
    from omni_moe.reference.router import router_backward_reference
    from omni_moe.triton.router_backward import router_backward

    bw = []
    for (T, N, k) in TARGETS:
        if time.time() - t_start > args.budget + 20:
            break
        x, y = make(T, N, torch.bfloat16, "randn", 5)
        _, idx = run_fwd(x, y, k, {}, 2)
        g = torch.randn(T, k, device=DEVICE).to(torch.bfloat16)
        dx, dy = router_backward(g, idx, N)
        ok = True
        if T <= 16384:
            rdx, rdy = router_backward_reference(g.cpu(), idx.cpu(), N)
            ok = torch.equal(dx.cpu(), rdx) and torch.equal(dy.cpu(), rdy)
        gsets = [(torch.randn(T, k, device=DEVICE).to(torch.bfloat16), idx) for _ in range(8)]
        med, gus = bench(lambda a, b: router_backward(a, b, N), gsets)
        floor = (T * k * (2 + 4) + 2 * T * N * 2) / 3.0e12 * 1e6
        # A second layout of the same kernel (C = 32 lanes per token), for comparison.
        alt = {"C": min(32, 1 << max(0, N - 1).bit_length()), "TILE_T": 4, "UNROLL": 4, "num_warps": 4}
        dx2, dy2 = router_backward(g, idx, N, config=alt)
        ok_alt = torch.equal(dx2, dx) and torch.equal(dy2, dy)
        med_d, gus_d = bench(lambda a, b: router_backward(a, b, N, config=alt), gsets)
        bw.append(dict(T=T, N=N, k=k, ok=ok, do_bench_us=med, graph_us=gus, floor_us=floor,
                       alt_ok=ok_alt, alt_do_bench_us=med_d, alt_graph_us=gus_d))
    res["backward"] = bw

    # Baselines (PyTorch pruned; full scan at T = 1024 only).
    base = []
    from omni_moe.reference.router import router_pruned

    try:
        from omni_moe.triton.omni_router import fullscan_router_forward
    except Exception:  # noqa: BLE001
        fullscan_router_forward = None
    for (T, N, k) in (TARGETS if args.baselines else []):
        if time.time() - t_start > args.budget + 30:
            break
        sets = rotating_inputs(T, N, torch.bfloat16, min_bytes=16 << 20, max_sets=32)
        med, _ = bench(lambda a, b: router_pruned(a, b, k), sets[:4], reps_graph=4)
        row = dict(T=T, N=N, k=k, torch_pruned_us=med)
        if fullscan_router_forward is not None and T <= 1024 and N <= 256:
            try:
                fullscan_router_forward(*sets[0], k)
                med2, _ = bench(lambda a, b: fullscan_router_forward(a, b, k), sets[:4], reps_graph=4)
                row["fullscan_us"] = med2
            except Exception as e:  # noqa: BLE001
                row["fullscan_us"] = f"{type(e).__name__}: {e}"[:200]
        base.append(row)
    res["baselines"] = base
    res["total_s"] = time.time() - t_start

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)

    # Compact table.
    print("\n# forward (us): do_bench median / graph per call")
    for (T, N, k), variants in by_case.items():
        row = [t for t in timings if (t["T"], t["N"], t["k"]) == (T, N, k)]
        cells = " ".join(f"{t['variant']}={t['do_bench_us']:.1f}/"
                         f"{'-' if isinstance(t['graph_us'], str) else round(t['graph_us'], 1)}"
                         for t in row)
        print(f"{T:>6} {N:>5} {k:>3} | {cells}")
    print("# backward (us): do_bench / graph / floor, ok")
    for b in bw:
        gu = "-" if isinstance(b["graph_us"], str) else round(b["graph_us"], 1)
        gd = "-" if isinstance(b["alt_graph_us"], str) else round(b["alt_graph_us"], 1)
        print(f"{b['T']:>6} {b['N']:>5} {b['k']:>3} | {b['do_bench_us']:.1f} / {gu} / {b['floor_us']:.1f} ok={b['ok']}"
              f" | C=32 {b['alt_do_bench_us']:.1f} / {gd} ok={b['alt_ok']}")
    print("# baselines (us)")
    for b in base:
        print(f"{b['T']:>6} {b['N']:>5} {b['k']:>3} | torch_pruned={b['torch_pruned_us']:.1f} fullscan={b.get('fullscan_us')}")
    print(f"# total {res['total_s']:.0f}s, failures {len(failures)}")


if __name__ == "__main__":
    sys.exit(main())
