"""GPU check of the atomic-expert op: correctness, determinism, timings, launch configs.

Run on a CUDA machine from the repository root:
    PYTHONUNBUFFERED=1 PYTHONPATH=. python scripts/check_expert_gpu.py [--no-sweep]

1. Correctness at E = 4096 and 65536, float32 and bf16, three consecutive calls with
   fresh inputs each: forward and all four gradients vs a float64 oracle (float32:
   rel L2 <= 1e-5; bf16: <= 2x the error of the same formula in naive bf16 PyTorch
   + a quarter bf16 rounding).
2. Determinism: two runs at (8192, 1024, 65536, 32) bf16 compared bitwise.
3. Timing (triton.testing.do_bench medians, bf16, int32 indices as the router gives
   them) at the issue's sizes of: the op forward / forward+backward; naive PyTorch
   autograd of the gather formula in bf16 ("naive"); the library's float32-accumulating
   PyTorch reference ("ref32"); each launch of the op alone; peak memory; the HBM floor.
4. Optional: a small sweep of each kernel's launch configuration.

Results: $OUT/expert_gpu.json (or ./expert_gpu.json); a table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from omni_moe import omni_expert  # noqa: E402
from omni_moe.reference.expert import (  # noqa: E402
    expert_backward_reference,
    expert_forward_reference,
    expert_naive,
)
from omni_moe.triton import omni_expert as kern  # noqa: E402
from test_expert import NAMES, ROUNDING, make_inputs, rel_l2, run_naive, run_op  # noqa: E402

ACTS = ("silu", "gelu", "relu")
SIZES = [(4096, 1024, 4096, 16), (8192, 1024, 65536, 32), (4096, 2048, 1048576, 16)]
HBM_TBPS = 3.0  # the anchors' convention; the measured copy bandwidth is reported too
RESULTS: dict = {"errors": []}
DEV = "cuda"  # --dry: "cpu" under TRITON_INTERPRET=1 with tiny sizes, to test this script


def log(*a):
    print(*a, flush=True)


def bench(fn, grad_to_none=None):
    if DEV == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median") * 1e3  # µs


# --------------------------------------------------------------------------- 1. correctness

def correctness(sizes):
    rows = []
    for (T, H, E, k) in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            for call in range(3):
                act = ACTS[call]
                inputs = make_inputs(T, H, E, k, dtype, DEV, "random", seed=1000 * call + E,
                                     idx_dtype=(torch.int32, torch.int64)[call % 2])
                got = run_op(*inputs, act)
                ref = run_naive(*inputs, act, torch.float64)
                naive = run_naive(*inputs, act, dtype) if dtype != torch.float32 else None
                errs, ok = {}, True
                for i, name in enumerate(NAMES):
                    e = rel_l2(got[i], ref[i])
                    if naive is None:
                        bound = 1e-5
                        errs[name] = e
                    else:
                        ne = rel_l2(naive[i], ref[i])
                        bound = 2 * ne + ROUNDING[dtype]
                        errs[name] = (e, ne)
                    ok &= e <= bound
                row = dict(T=T, H=H, E=E, k=k, dtype=str(dtype), act=act, call=call, ok=bool(ok), errs=errs)
                rows.append(row)
                log("correct" if ok else "WRONG", row)
                del inputs, got, ref, naive
                empty_cache()
    RESULTS["correctness"] = rows


# --------------------------------------------------------------------------- 2. determinism

def determinism(size):
    T, H, E, k = size
    inputs = cuda_inputs(T, H, E, k, torch.bfloat16, seed=5)
    a = run_op(*inputs, "silu")
    b = run_op(*inputs, "silu")
    same = [bool(torch.equal(x, y)) for x, y in zip(a, b)]
    RESULTS["determinism"] = dict(zip(NAMES, same))
    log("determinism (bitwise equal):", RESULTS["determinism"])


# --------------------------------------------------------------------------- 3. timing

def cuda_inputs(T, H, E, k, dtype, seed, requires_grad=False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    h = torch.randn(T, H, device=DEV, dtype=dtype, generator=g)
    up = (torch.randn(E, H, device=DEV, generator=g, dtype=dtype) * (2.0 / H ** 0.5))
    down = torch.randn(E, H, device=DEV, dtype=dtype, generator=g)
    w = (torch.rand(T, k, device=DEV, generator=g) + 0.05).to(dtype)
    idx = torch.randint(0, E, (T, k), device=DEV, generator=g, dtype=torch.int32)
    go = torch.randn(T, H, device=DEV, dtype=dtype, generator=g)
    for x in (h, up, down, w):
        x.requires_grad_(requires_grad)
    return h, up, down, w, idx, go


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


class Rotor:
    """Cycle through input sets so repeated runs do not just measure the L2 cache."""

    def __init__(self, sets):
        self.sets, self.i = sets, 0

    def next(self):
        s = self.sets[self.i % len(self.sets)]
        self.i += 1
        return s


def peak_mem(fn):
    if DEV == "cpu":
        fn()
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20  # MiB above the inputs


def graph_time(fn, leaves):
    """Median replay time of ``fn`` captured in a CUDA graph (no host launch overhead)."""
    if DEV == "cpu":
        return None
    for x in leaves:
        x.grad = None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
            for x in leaves:
                x.grad = None
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    us = bench(g.replay)
    del g
    for x in leaves:
        x.grad = None
    return us


def copy_bandwidth():
    if DEV == "cpu":
        return 1.0
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    us = bench(lambda: y.copy_(x))
    return 2 * 2**30 / (us * 1e-6) / 1e12  # TB/s, read + write


def time_case(T, H, E, k, tbps):
    dtype = torch.bfloat16
    set_bytes = (2 * E * H + 2 * T * H) * 2
    nsets = max(1, min(4, math.ceil(120e6 / set_bytes)))
    # h, up, down, w require grad (the forward-only timings run under no_grad).
    sets = [cuda_inputs(T, H, E, k, dtype, seed=s, requires_grad=True) for s in range(nsets)]
    row = dict(T=T, H=H, E=E, k=k, sets=nsets)
    D = kern.expected_distinct_experts(T, k, E)
    actual_D = int(torch.unique(sets[0][4]).numel())
    row["distinct_expected"], row["distinct"] = D, actual_D
    for name, kw in (("floor_fwd", {}), ("floor_fwdbwd_dense", dict(backward=True)),
                     ("floor_fwdbwd_sparse", dict(backward=True, dense_weight_grads=False))):
        b = kern.expert_floor_bytes(T, H, E, k, 2, distinct=actual_D, **kw)
        row[name + "_MiB"] = b / 2**20
        row[name + "_us"] = b / (HBM_TBPS * 1e12) * 1e6
        row[name + "_us_measuredbw"] = b / (tbps * 1e12) * 1e6

    def fwd(fn):
        r = Rotor(sets)

        def f():
            h, up, down, w, idx, _ = r.next()
            return fn(h, up, down, w, idx, "silu")
        return f

    def fwdbwd(fn):
        r = Rotor(sets)

        def f():
            h, up, down, w, idx, go = r.next()
            fn(h, up, down, w, idx, "silu").backward(go)
        return f

    all_leaves = [x for s in sets for x in s[:4]]

    @torch.no_grad()
    def ref32_fwdbwd(h, up, down, w, idx, go):
        out, a = expert_forward_reference(h, up, down, w, idx, "silu")
        return expert_backward_reference(go, h, up, down, w, idx, a, "silu")

    r32 = Rotor(sets)
    impls = {
        "op": (fwd(omni_expert), fwdbwd(omni_expert)),
        "naive": (fwd(expert_naive), fwdbwd(expert_naive)),
        "ref32": (fwd(lambda *a: expert_forward_reference(*a)[0]), lambda: ref32_fwdbwd(*r32.next())),
    }
    for name, (f, fb) in impls.items():
        try:
            with torch.no_grad():
                row[name + "_fwd_us"] = bench(f)
            row[name + "_fwdbwd_us"] = bench(fb, grad_to_none=all_leaves)
            for x in all_leaves:
                x.grad = None
            row[name + "_fwdbwd_peak_MiB"] = peak_mem(fb)
            for x in all_leaves:
                x.grad = None
        except torch.OutOfMemoryError as exc:
            row[name + "_error"] = "OOM: " + str(exc).split("\n")[0]
            for x in all_leaves:
                x.grad = None
            empty_cache()
        log(name, {kk: v for kk, v in row.items() if kk.startswith(name)})
    for name, fn in (("op_fwdbwd_graph_us", impls["op"][1]),):
        try:
            row[name] = graph_time(fn, all_leaves)
        except Exception as exc:  # noqa: BLE001 - optional measurement
            row[name] = "error: " + repr(exc)[:300]
        log(name, row[name])

    # Each launch alone, on set 0.
    h, up, down, w, idx, go = (x.detach() for x in sets[0])
    out, a, se, perm = kern.expert_forward(h, up, down, w, idx, "silu")
    c = torch.empty(T, k, device=DEV, dtype=torch.float32)
    dw = torch.empty_like(w)
    da = torch.empty(T, k, device=DEV, dtype=torch.float32)
    da_s = torch.empty(T * k, device=DEV, dtype=torch.float32)
    c_s = torch.empty_like(da_s)
    t_s = torch.empty(T * k, device=DEV, dtype=torch.int32)
    off = kern.expert_offsets(se, E)
    dup, ddown, dh = torch.empty_like(up), torch.empty_like(down), torch.empty_like(h)
    parts = {
        "sort": lambda: kern.group_pairs(idx, E),
        "pair_dot_fwd": lambda: kern.launch_pair_dot(up, h, se, perm, w, a, "silu", c=c),
        "gather_fwd(out)": lambda: kern.launch_gather_combine(down, idx, c, out),
        "offsets": lambda: kern.expert_offsets(se, E),
        "pair_dot_bwd": lambda: kern.launch_pair_dot(down, go, se, perm, w, a, "silu", backward=True,
                                                     dw=dw, da=da, da_sorted=da_s, c_sorted=c_s,
                                                     tok_sorted=t_s),
        "expert_grads": lambda: kern.launch_expert_grads(off, t_s, da_s, c_s, h, go, dup, ddown),
        "gather_bwd(dh)": lambda: kern.launch_gather_combine(up, idx, da, dh),
        "zeros_like(up)x2": lambda: (torch.zeros_like(up), torch.zeros_like(down)),
    }
    with torch.no_grad():
        row["parts_us"] = {name: bench(fn) for name, fn in parts.items()}
        parts["expert_grads"]()  # leaves dup/ddown = the default kernel's result
    log("parts", row["parts_us"])
    return row, (sets, parts, (dup, ddown))


SWEEP = {
    "pair_dot": [(8, 256, 4), (4, 256, 4), (4, 512, 4), (8, 512, 8), (2, 1024, 4), (16, 256, 4)],
    "gather": [(4, 256, 2, 4), (4, 256, 4, 4), (2, 512, 2, 4), (8, 256, 2, 4), (2, 256, 2, 4), (4, 512, 2, 8)],
}


def sweep(parts, T, H, E, k, grads):
    """Time each launch under other configurations; expert-grad variants are also
    checked against the default's du/dv (max abs difference over max abs value)."""
    res = {}
    eg = [(4, 256, 2, 4), (8, 256, 2, 4), (8, 256, 4, 4), (16, 128, 2, 4), (4, 512, 2, 4), (2, 1024, 2, 4),
          (16, 256, 2, 8)]
    dup0, ddown0 = (g.float().clone() for g in grads)
    for kind, part, cands in (("pair_dot", "pair_dot_fwd", SWEEP["pair_dot"]),
                              ("gather", "gather_fwd(out)", SWEEP["gather"]),
                              ("expert_grad", "expert_grads", eg)):
        res[kind] = {}
        for cfg in cands:
            kern.CONFIG_OVERRIDE[kind] = cfg
            try:
                with torch.no_grad():
                    res[kind][str(cfg)] = bench(parts[part])
                    if kind == "expert_grad":
                        grads[0].fill_(float("nan"))
                        grads[1].fill_(float("nan"))
                        parts[part]()
                        diff = max(((g.float() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                                   for g, r in zip(grads, (dup0, ddown0)))
                        res[kind][str(cfg) + " reldiff"] = diff
            except Exception as exc:  # noqa: BLE001 - record and go on
                res[kind][str(cfg)] = "error: " + repr(exc)[:200]
            finally:
                kern.CONFIG_OVERRIDE[kind] = None
        log("sweep", kind, res[kind])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--dry", action="store_true", help="tiny sizes on CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    global DEV, SIZES
    out_dir = os.environ.get("OUT", ".")
    corr_sizes = [(4096, 1024, 4096, 16), (2048, 1024, 65536, 32)]
    if args.dry:
        DEV = "cpu"
        SIZES = [(16, 32, 8, 4), (8, 32, 64, 2)]
        corr_sizes = SIZES
        RESULTS["env"] = dict(device="cpu (dry run)", torch=torch.__version__, triton=triton.__version__,
                              date=datetime.datetime.now(datetime.timezone.utc).isoformat())
    else:
        props = torch.cuda.get_device_properties(0)
        RESULTS["env"] = dict(device=torch.cuda.get_device_name(0), sms=props.multi_processor_count,
                              torch=torch.__version__, triton=triton.__version__,
                              date=datetime.datetime.now(datetime.timezone.utc).isoformat())
    log(RESULTS["env"])
    t0 = time.time()
    tbps = copy_bandwidth()
    RESULTS["copy_TBps"] = tbps
    log(f"device-to-device copy: {tbps:.2f} TB/s (read + write)")

    def step(name, fn, *a):
        try:
            return fn(*a)
        except Exception:  # noqa: BLE001 - keep going, record
            tb = traceback.format_exc()
            RESULTS["errors"].append(f"{name}: {tb}")
            log(f"ERROR in {name}:\n{tb}")
        finally:
            save(out_dir)

    if not args.skip_correctness:
        step("correctness", correctness, corr_sizes)
        step("determinism", determinism, SIZES[1])
    log(f"[{time.time() - t0:.0f}s] timing")
    RESULTS["timing"] = []
    RESULTS["sweep"] = []
    for size in SIZES:
        r = step(f"time {size}", time_case, *size, tbps)
        if r is None:
            continue
        row, (sets, parts, grads) = r
        RESULTS["timing"].append(row)
        if not args.no_sweep:
            row["sweep"] = step(f"sweep {size}", sweep, parts, *size, grads)
        del sets, parts, grads, r
        empty_cache()
        log(f"[{time.time() - t0:.0f}s] done {size}")
    save(out_dir)
    table()


def save(out_dir):
    with open(os.path.join(out_dir, "expert_gpu.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def table():
    env = RESULTS["env"]
    log(f"\n== {env['device']}  torch {env['torch']}  triton {env['triton']}  {env['date'][:10]}  "
        f"copy {RESULTS['copy_TBps']:.2f} TB/s")
    if "correctness" in RESULTS:
        bad = [r for r in RESULTS["correctness"] if not r["ok"]]
        log(f"correctness: {len(RESULTS['correctness']) - len(bad)}/{len(RESULTS['correctness'])} ok"
            + ("" if not bad else f"  FAILED: {[(r['E'], r['dtype'], r['act']) for r in bad]}"))
        worst32 = max((max(r["errs"].values()) for r in RESULTS["correctness"] if "float32" in r["dtype"]),
                      default=None)
        log(f"  worst float32 rel L2: {worst32}")
    if "determinism" in RESULTS:
        log(f"determinism: {RESULTS['determinism']}")
    log("T H E k | op fwd, fwd+bwd (us) | naive fwd, fwd+bwd | ref32 fwd+bwd | speedup vs naive (fwd+bwd) "
        "| floor fwd, fwd+bwd dense/sparse @3TB/s | op/floor (dense) | peak MiB op/naive")
    for r in RESULTS.get("timing", []):
        def g(key, fmt="{:.0f}"):
            v = r.get(key)
            return fmt.format(v) if isinstance(v, (int, float)) else "-"
        sp = (r["naive_fwdbwd_us"] / r["op_fwdbwd_us"]) if "naive_fwdbwd_us" in r and "op_fwdbwd_us" in r else None
        ratio = r["op_fwdbwd_us"] / r["floor_fwdbwd_dense_us"] if "op_fwdbwd_us" in r else None
        ratio_f = r["op_fwd_us"] / r["floor_fwd_us"] if "op_fwd_us" in r else None
        log(f"{r['T']} {r['H']} {r['E']} {r['k']} | {g('op_fwd_us')}, {g('op_fwdbwd_us')} | "
            f"{g('naive_fwd_us')}, {g('naive_fwdbwd_us')} | {g('ref32_fwdbwd_us')} | "
            f"{'-' if sp is None else f'{sp:.1f}x'} | {g('floor_fwd_us')}, {g('floor_fwdbwd_dense_us')}/"
            f"{g('floor_fwdbwd_sparse_us')} | fwd {'-' if ratio_f is None else f'{ratio_f:.1f}x'} "
            f"fwd+bwd {'-' if ratio is None else f'{ratio:.1f}x'} | {g('op_fwdbwd_peak_MiB')}/"
            f"{g('naive_fwdbwd_peak_MiB')}")
        parts = r.get("parts_us", {})
        log(f"    graph-replayed op fwd+bwd: {r.get('op_fwdbwd_graph_us')}; sum of op launches "
            f"{sum(v for kk, v in parts.items() if not kk.startswith('zeros')):.0f} us")
        log("    parts (us): " + ", ".join(f"{kk} {v:.0f}" for kk, v in parts.items()))
        for kind, res in (r.get("sweep") or {}).items():
            log(f"    sweep {kind}: " + ", ".join(
                (f"(diff {v:.0e})" if c.endswith("reldiff") else f"{c} {v:.0f}") if isinstance(v, float)
                else f"{c} ERR" for c, v in res.items()))
    if RESULTS["errors"]:
        log(f"ERRORS: {len(RESULTS['errors'])} (see expert_gpu.json)")


if __name__ == "__main__":
    main()
