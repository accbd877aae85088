"""Where the OmniMoE layer's time goes, and old vs new code in one run (docs/layer.md).

Run on a CUDA machine from the repository root:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python scripts/profile_layer.py [--baseline DIR] [--quick]

``--baseline DIR`` (default ``scripts/_profile_baseline`` when it exists) or
``--baseline-git REV`` (extracts REV's version of the expert/MLP/module files): older
copies of some library files (same relative paths, e.g. ``omni_moe/expert.py``).  The script builds a package ``omni_moe_base`` = the current
``omni_moe`` with those files swapped in (custom-op namespace renamed so both load in
one process) and times it next to the current code on the same inputs, the same
device and the same warm machine.

For each case (T, H, I, E, k), bf16, silu:
  1. checks: the expert path against a float32 oracle (omni_moe.bench.layer.check_expert),
     the fused router prologue against the plain PyTorch one, and the new layer's
     output / gradients against the old layer's (same parameters);
  2. times (triton.testing.do_bench medians, L2 flushed before each call) forward and
     forward+backward of: layer, expert, router, dense_mlp, reference -- new and old;
  3. GPU-only time of layer and expert fwd+bwd (CUDA-graph replay) and the host time
     of one eager fwd+bwd (perf_counter around the Python calls, GPU drained first);
  4. at the first case: torch.profiler of one layer fwd+bwd (new and old), with GPU
     kernels grouped by kind and the host time of each component;
  5. the expert op under both schedules and several expert-gradient tilings, and the
     host cost of single calls (empty op, aten kernel, cuBLAS, Triton launch, ...).
Results: $OUT/profile_layer.json (+ profiler tables and chrome traces); a summary
table is printed last.  ``--dry`` runs tiny sizes on CPU (TRITON_INTERPRET=1) to test
this script.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

BASELINE_FILES = ["omni_moe/expert.py", "omni_moe/triton/omni_expert.py", "omni_moe/modules/omni_moe.py",
                  "omni_moe/mlp.py", "omni_moe/triton/swiglu.py"]
CASES = [(4096, 1024, 4096, 4096, 16), (8192, 1024, 4096, 65536, 32), (4096, 2048, 8192, 1048576, 16)]
DRY_CASES = [(64, 48, 64, 64, 4), (40, 40, 32, 100, 3)]
OUT = os.environ.get("OUT", os.path.join(ROOT, "out"))
T0 = time.perf_counter()
RES: dict = {"errors": [], "cases": []}
DEV = "cuda"


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def elapsed():
    return time.perf_counter() - T0


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def free():
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def save():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "profile_layer.json"), "w") as f:
        json.dump(RES, f, indent=1, default=str)


# --------------------------------------------------------------------------- baseline package

def build_baseline(src_dir):
    """Import ``omni_moe_base``: omni_moe with the files of ``src_dir`` swapped in."""
    tmp = tempfile.mkdtemp(prefix="omni_base_")
    dst = os.path.join(tmp, "omni_moe_base")
    shutil.copytree(os.path.join(ROOT, "omni_moe"), dst,
                    ignore=shutil.ignore_patterns("__pycache__"))
    swapped = []
    for dirpath, _, files in os.walk(os.path.join(src_dir, "omni_moe")):
        for fn in files:
            if fn.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, fn), os.path.join(src_dir, "omni_moe"))
                shutil.copy(os.path.join(dirpath, fn), os.path.join(dst, rel))
                swapped.append(rel)
    for dirpath, _, files in os.walk(dst):
        for fn in files:
            if fn.endswith(".py"):
                p = os.path.join(dirpath, fn)
                s = open(p).read()
                s = s.replace('"omni_moe::', '"omni_moe_base::').replace("torch.ops.omni_moe.",
                                                                         "torch.ops.omni_moe_base.")
                s = re.sub(r"\bfrom omni_moe\b", "from omni_moe_base", s)
                s = re.sub(r"\bimport omni_moe\b", "import omni_moe_base", s)
                open(p, "w").write(s)
    sys.path.insert(0, tmp)
    base = importlib.import_module("omni_moe_base")
    log(f"baseline package omni_moe_base: swapped in {sorted(swapped)}")
    return base


# --------------------------------------------------------------------------- timing helpers

def bench_ms(fn, grad_to_none=None, rep=100):
    if DEV != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none,
                                         return_mode="median"))


def host_ms(fn, leaves=(), n=7):
    """Median host time of one call (Python + launches), the GPU drained before each."""
    ts = []
    for _ in range(n):
        for t in leaves:
            t.grad = None
        sync()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    sync()
    for t in leaves:
        t.grad = None
    return statistics.median(ts) * 1e3


def graph_ms(fn, leaves=()):
    """GPU time of one call replayed from a CUDA graph (no host overhead), or an error."""
    if DEV != "cuda":
        return None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                for t in leaves:
                    t.grad = None
                fn()
        torch.cuda.current_stream().wait_stream(s)
        sync()
        for t in leaves:
            t.grad = None
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        sync()
        ms = bench_ms(g.replay)
        del g
        for t in leaves:
            t.grad = None
        return ms
    except Exception as e:  # noqa: BLE001 -- a capture failure is a finding
        return f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


# --------------------------------------------------------------------------- profiler

KINDS = [
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|ampere_|Kernel2"),
    ("expert", r"_token_|_expert_grad|_pair_dot|_gather_combine"),
    ("sort/offsets", r"sort|radix|Radix|cub::|searchsorted|arange|Onesweep|onesweep"),
    ("router", r"router|_pruned|_fullscan|_router_bwd|split_experts"),
    ("router prologue", r"_stats_|_rows_|_sums_|_bn_backward|batch_norm|softmax|bn_|BatchNorm"),
    ("swiglu", r"swiglu"),
    ("elementwise/copy/fill", r"elementwise|vectorized|copy|fill|Memset|memset|CatArray|cat|reduce"),
]


def kind_of(name):
    for k, pat in KINDS:
        if re.search(pat, name):
            return k
    return "other"


def profile_step(step, leaves, tag, steps=3):
    """torch.profiler of ``steps`` fwd+bwd calls: GPU kernels by kind, per step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    for _ in range(2):
        for t in leaves:
            t.grad = None
        step()
    sync()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            for t in leaves:
                t.grad = None
            step()
            sync()
    for t in leaves:
        t.grad = None
    kernels = {}
    for e in prof.events():
        # (record_function ranges also show up on the GPU timeline: skip them)
        if str(getattr(e, "device_type", "")).endswith("CUDA") and not e.name.startswith("omni::"):
            us = float(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) or 0.0)
            kernels.setdefault(e.name, [0, 0.0])
            kernels[e.name][0] += 1
            kernels[e.name][1] += us
    by_kind = {}
    for name, (n, us) in kernels.items():
        k = kind_of(name)
        d = by_kind.setdefault(k, {"launches": 0, "us": 0.0})
        d["launches"] += n / steps
        d["us"] += us / steps
    rows = sorted(((us / steps, n / steps, name) for name, (n, us) in kernels.items()), reverse=True)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"profile_{tag}.txt"), "w") as f:
        f.write(f"GPU kernels per step ({steps} steps), us / launches / name:\n")
        for us, n, name in rows:
            f.write(f"{us:10.1f} {n:5.1f}  {name[:160]}\n")
        f.write("\nCPU-side ops (key_averages by CPU total):\n")
        try:
            f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=70))
        except Exception as e:  # noqa: BLE001
            f.write(f"(table failed: {e})\n")
    try:
        prof.export_chrome_trace(os.path.join(OUT, f"trace_{tag}.json"))
    except Exception as e:  # noqa: BLE001
        RES["errors"].append(f"trace {tag}: {e}")
    # host time of annotated components (record_function ranges and autograd nodes)
    comp = {}
    for ka in prof.key_averages():
        if ka.key.startswith(("omni::", "autograd::engine::evaluate_function")):
            comp[ka.key[:120]] = round(ka.cpu_time_total / max(1, steps), 1)
    gpu_total = sum(d["us"] for d in by_kind.values())
    return {"gpu_kernel_us_per_step": gpu_total,
            "launches_per_step": sum(d["launches"] for d in by_kind.values()),
            "by_kind": {k: {"us": round(v["us"], 1), "launches": round(v["launches"], 1)}
                        for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]["us"])},
            "top_kernels": [(round(us, 1), round(n, 1), name[:120]) for us, n, name in rows[:25]],
            "host_components_us": comp}


def annotate(mod_ns, names):
    """Wrap callables of ``mod_ns`` (a module's functions or a class's methods) in
    record_function ranges named omni::<name> (profiling only); returns an undo function."""
    undo = []
    for name in names:
        fn = mod_ns.__dict__.get(name) if isinstance(mod_ns, type) else getattr(mod_ns, name, None)
        if fn is None or isinstance(fn, type):
            continue

        def wrapped(*a, _fn=fn, _name=name, **k):
            with torch.profiler.record_function("omni::" + _name):
                return _fn(*a, **k)

        setattr(mod_ns, name, wrapped)
        undo.append((name, fn))
    return lambda: [setattr(mod_ns, n, f) for n, f in undo]


# --------------------------------------------------------------------------- one case

def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


def run_case(case, base, args, first):
    import omni_moe
    from omni_moe import OmniMoE, OmniMoEConfig
    from omni_moe.bench.layer import check_expert
    from omni_moe.expert import omni_expert
    from omni_moe.mlp import swiglu_mlp
    from omni_moe.reference.moe import expert_reference

    T, H, I, E, K = case
    dtype = torch.bfloat16
    row = {"case": case, "times_ms": {}, "checks": {}, "graph_ms": {}, "host_ms": {}}
    RES["cases"].append(row)
    torch.manual_seed(0)
    cfg = OmniMoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_token=K)
    with torch.device(DEV):
        new = OmniMoE(cfg)
    new = new.to(dtype)
    h = torch.randn(T, H, device=DEV, dtype=dtype)
    gout = torch.randn(T, H, device=DEV, dtype=dtype)
    t1 = time.perf_counter()
    new(h.detach().requires_grad_()).backward(gout)
    sync()
    row["first_step_s_new"] = time.perf_counter() - t1
    new.zero_grad(set_to_none=True)
    old = None
    if base is not None:
        bcfg = base.OmniMoEConfig(hidden_size=H, intermediate_size=I, num_experts=E,
                                  num_experts_per_token=K)
        with torch.device("meta"):
            old = base.OmniMoE(bcfg)
        old = old.to_empty(device=DEV).to(dtype)
        sd = {k: v for k, v in new.state_dict().items() if "embed" not in k}
        old.load_state_dict(sd, strict=False)
        old.up_embed, old.down_embed = new.up_embed, new.down_embed      # shared (memory)
        t1 = time.perf_counter()
        old(h.detach().requires_grad_()).backward(gout)
        sync()
        row["first_step_s_old"] = time.perf_counter() - t1
        old.zero_grad(set_to_none=True)
        new.zero_grad(set_to_none=True)
    with torch.no_grad():
        scores, idx = new.route(h)
    w = scores.exp()
    D = int(torch.unique(idx).numel())
    row["distinct_experts"] = D
    log(f"case {case}: D={D}, first step new {row['first_step_s_new']:.2f}s"
        + (f" old {row['first_step_s_old']:.2f}s" if old is not None else ""))

    # 1. checks ------------------------------------------------------------------
    try:
        res = check_expert(h, new.up_embed.weight, new.down_embed.weight, w, idx, "silu", dtype)
        row["checks"]["expert_vs_fp32_oracle"] = res
        log("  expert vs fp32 oracle:", {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in res.items()})
        free()
        from omni_moe.triton import omni_expert as kern

        default_mode = kern.choose_mode(T, H, E, K, 2)
        other = "expert" if default_mode == "token" else "token"
        row["mode"] = default_mode
        kern.CONFIG_OVERRIDE["mode"] = other
        try:
            res3 = check_expert(h, new.up_embed.weight, new.down_embed.weight, w, idx, "silu", dtype)
        finally:
            kern.CONFIG_OVERRIDE["mode"] = None
        row["checks"][f"expert_{other}_schedule_vs_fp32_oracle"] = res3
        log(f"  default schedule {default_mode!r}; forced {other!r} schedule vs fp32 oracle: pass =", res3["pass"])
        free()
        cnt = torch.bincount(idx.reshape(-1).long(), minlength=E)
        blk4 = cnt[: E // 4 * 4].view(-1, 4).max(dim=1).values
        row["pair_counts"] = {"max": int(cnt.max()), "mean_used": float(cnt[cnt > 0].float().mean()),
                              "p99": float(cnt.float().quantile(0.99)) if E <= 2**24 else None,
                              "padding_4_experts": float(4 * blk4.sum() / max(1, int(cnt.sum())))}
        log("  pairs per expert:", row["pair_counts"])
        del cnt, blk4
        if first:
            kern.CONFIG_OVERRIDE["token"] = (1, 256, 2, 4)      # the two-phase path (H > BLOCK_H)
            try:
                res2 = check_expert(h, new.up_embed.weight, new.down_embed.weight, w, idx, "silu", dtype)
            finally:
                kern.CONFIG_OVERRIDE["token"] = None
            row["checks"]["expert_two_phase_vs_fp32_oracle"] = res2
            log("  expert (two-phase config) vs fp32 oracle: pass =", res2["pass"])
            outs = []
            for _ in range(2):
                leaves = [x.detach().clone().requires_grad_() for x in (h, new.up_embed.weight,
                                                                         new.down_embed.weight, w)]
                o = omni_expert(*leaves, idx, "silu")
                o.backward(gout)
                outs.append([o.detach()] + [x.grad for x in leaves])
                del leaves
            row["checks"]["expert_bitwise_deterministic"] = all(torch.equal(a, b) for a, b in zip(*outs))
            log("  expert bitwise deterministic:", row["checks"]["expert_bitwise_deterministic"])
            del outs
            free()
        import copy
        twin = copy.copy(new)            # shares parameters and buffers
        twin.__dict__ = dict(new.__dict__)
        twin._fused_router_mode = lambda x: None
        st = {k: v.clone() for k, v in new.state_dict().items() if "norm" in k}
        xa, xb = h.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
        pa = new.router_log_probs(xa)
        for k, v in st.items():           # the twin starts from the same statistics
            new.state_dict()[k].copy_(v)
        pb = twin.router_log_probs(xb)
        gp = [torch.randn_like(t) for t in pa]
        torch.autograd.backward(pa, gp)
        torch.autograd.backward(pb, gp)
        row["checks"]["fused_router_prologue_vs_plain"] = {
            "px": rel(pa[0], pb[0]), "py": rel(pa[1], pb[1]), "d_input": rel(xa.grad, xb.grad)}
        log("  fused router prologue vs plain:", row["checks"]["fused_router_prologue_vs_plain"])
        del pa, pb, xa, xb, twin, gp
        new.zero_grad(set_to_none=True)
        if old is not None:
            sd = {k: v for k, v in new.state_dict().items() if "embed" not in k}
            old.load_state_dict(sd, strict=False)
            xa, xb = h.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
            oa, (_, ia) = new(xa, return_routing=True)
            ob, (_, ib) = old(xb, return_routing=True)
            oa.backward(gout)
            ob.backward(gout)
            same = (ia == ib).all(dim=-1)
            c = {"tokens_with_same_routing": float(same.float().mean()),
                 "out_rel_same_routing_tokens": rel(oa[same], ob[same]),
                 "d_input_rel": rel(xa.grad, xb.grad)}
            for n, p in new.named_parameters():
                q = dict(old.named_parameters())[n]
                if p is not q and p.grad is not None:
                    c["d_" + n] = rel(p.grad, q.grad)
            row["checks"]["new_vs_old_layer"] = c
            log("  new vs old layer (bf16):", {k: round(v, 5) for k, v in c.items()})
            del oa, ob, xa, xb
            new.zero_grad(set_to_none=True)
            old.zero_grad(set_to_none=True)
    except Exception as e:  # noqa: BLE001
        RES["errors"].append(f"checks {case}: {traceback.format_exc()[-1500:]}")
        log("  CHECK ERROR", e)
    free()
    save()

    # 2. timings -------------------------------------------------------------------
    h_req = h.detach().clone().requires_grad_()
    w_req = w.detach().clone().requires_grad_()
    U, V = new.up_embed.weight, new.down_embed.weight
    gs = torch.randn(T, K, device=DEV)

    def plans(layer, ns):
        Wg, Wu, Wd = layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight
        rl = [h_req, layer.router_gate_x.weight, layer.router_gate_y.weight]
        return {
            "layer": (lambda: layer(h), lambda: layer(h_req).backward(gout), [h_req] + list(layer.parameters())),
            "expert": (lambda: ns.omni_expert(h, U, V, w, idx, "silu"),
                       lambda: ns.omni_expert(h_req, U, V, w_req, idx, "silu").backward(gout), [h_req, U, V, w_req]),
            "router": (lambda: layer.route(h), lambda: layer.route(h_req)[0].backward(gs), rl),
            "dense_mlp": (lambda: ns.mlp.swiglu_mlp(h, Wg, Wu, Wd, "silu"),
                          lambda: ns.mlp.swiglu_mlp(h_req, Wg, Wu, Wd, "silu").backward(gout), [h_req, Wg, Wu, Wd]),
        }

    variants = [("new", new, omni_moe)] + ([("old", old, base)] if old is not None else [])
    for tag, layer, ns in variants:
        pl = plans(layer, ns)
        if tag == "new":
            pl["reference"] = (lambda: expert_reference(h, U, V, w, idx, "silu"),
                               lambda: expert_reference(h_req, U, V, w_req, idx, "silu").backward(gout),
                               [h_req, U, V, w_req])
        for name, (fwd, step, leaves) in pl.items():
            try:
                with torch.no_grad():
                    ms_f = bench_ms(fwd)
                ms_b = bench_ms(step, grad_to_none=leaves)
                row["times_ms"][f"{tag} {name} fwd"] = ms_f
                row["times_ms"][f"{tag} {name} fwd+bwd"] = ms_b
                msg = f"  {tag:3s} {name:10s} fwd {ms_f:8.3f}  fwd+bwd {ms_b:8.3f} ms"
                if name in ("layer", "expert", "dense_mlp") and (first or args.graphs_all or E <= 65536):
                    gm = graph_ms(step, leaves) if not (tag == "old" and name == "layer") else "not captured (baseline capture fails)"
                    hm = host_ms(step, leaves)
                    row["graph_ms"][f"{tag} {name} fwd+bwd"] = gm
                    row["host_ms"][f"{tag} {name} fwd+bwd"] = hm
                    with torch.no_grad():
                        row["host_ms"][f"{tag} {name} fwd"] = host_ms(fwd)
                    msg += (f" | GPU-only (graph) {gm if not isinstance(gm, float) else f'{gm:.3f}'}"
                            f" | host issue time fwd+bwd {hm:.3f}, fwd {row['host_ms'][f'{tag} {name} fwd']:.3f}")
                log(msg)
            except Exception as e:  # noqa: BLE001
                RES["errors"].append(f"timing {tag} {name} {case}: {traceback.format_exc()[-1500:]}")
                log(f"  {tag} {name}: ERROR {type(e).__name__}: {str(e)[:200]}")
            finally:
                for t in leaves:
                    t.grad = None
                free()
        save()

    # 3. profiles (first case only) -----------------------------------------------------
    if first:
        for tag, layer, ns in variants:
            try:
                mod = sys.modules[ns.__name__ + ".modules.omni_moe"]
                undo1 = annotate(mod, ["omni_router", "omni_expert", "omni_expert_from_scores", "swiglu"])
                undo2 = annotate(type(layer), ["route", "router_log_probs"])
                try:
                    p = profile_step(lambda: layer(h_req).backward(gout), [h_req] + list(layer.parameters()),
                                     f"layer_{tag}")
                finally:
                    undo1()
                    undo2()
                row[f"profile_layer_{tag}"] = p
                log(f"  profile {tag} layer fwd+bwd: GPU kernels {p['gpu_kernel_us_per_step']:.0f} us in "
                    f"{p['launches_per_step']:.0f} launches/step; by kind: "
                    + ", ".join(f"{k} {v['us']:.0f}us/{v['launches']:.0f}" for k, v in p["by_kind"].items()))
            except Exception as e:  # noqa: BLE001
                RES["errors"].append(f"profile {tag}: {traceback.format_exc()[-1500:]}")
                log("  PROFILE ERROR", e)
            save()
    del h_req, w_req
    free()
    return new, old, (h, gout, w, idx)


def sweep(case, new_inputs):
    """The expert op's fwd+bwd under each schedule and expert-grad tiling (ms)."""
    from omni_moe import omni_expert
    from omni_moe.triton import omni_expert as kern

    T, H, I, E, K = case
    layer, (h, gout, w, idx) = new_inputs
    U, V = layer.up_embed.weight, layer.down_embed.weight
    h_req = h.detach().clone().requires_grad_()
    w_req = w.detach().clone().requires_grad_()
    leaves = [h_req, U, V, w_req]
    res = {}
    hp = min(1024, 1 << (H - 1).bit_length())
    for mode in ("token", "expert"):
        for eg in (None, (1, hp, 2, 8, 1), (4, 256, 2, 4), (1, hp, 2, 4)):
            if elapsed() > ARGS.deadline:
                return res
            kern.CONFIG_OVERRIDE["mode"] = mode
            kern.CONFIG_OVERRIDE["expert_grad"] = eg
            key = f"{mode} expert_grad={eg or 'default ' + str(kern._expert_grad_config(T * K, E, H))}"
            try:
                with torch.no_grad():
                    f = bench_ms(lambda: omni_expert(h, U, V, w, idx, "silu")) if eg is None else None
                b = bench_ms(lambda: omni_expert(h_req, U, V, w_req, idx, "silu").backward(gout),
                             grad_to_none=leaves)
                res[key] = {"fwd": f, "fwd+bwd": b}
            except Exception as e:  # noqa: BLE001
                res[key] = f"error {type(e).__name__}: {str(e)[:200]}"
            finally:
                kern.CONFIG_OVERRIDE["mode"] = None
                kern.CONFIG_OVERRIDE["expert_grad"] = None
                for t in leaves:
                    t.grad = None
    try:
        se, perm = kern.group_pairs(idx, E)
        res["sort (group_pairs)"] = bench_ms(lambda: kern.group_pairs(idx, E))
        res["sort int32 keys"] = bench_ms(lambda: torch.sort(idx.reshape(-1), stable=True))
        res["offsets (searchsorted)"] = bench_ms(lambda: kern.expert_offsets(se, E))
        res["zeros_like(up)+zeros_like(down)"] = bench_ms(lambda: (torch.zeros_like(U), torch.zeros_like(V)))
    except Exception as e:  # noqa: BLE001
        res["grouping"] = f"error {type(e).__name__}: {str(e)[:200]}"
    return res


def host_costs():
    """Host time (us) of single calls: what one op costs this CPU before the GPU runs it."""
    import triton
    import triton.language as tl

    from omni_moe import omni_router
    from omni_moe.triton import omni_expert as kern

    @triton.jit
    def _tiny(X, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(X + offs, 1.0, mask=offs < n)

    x = torch.zeros(1024, device=DEV)
    a = torch.randn(256, 256, device=DEV, dtype=torch.bfloat16)
    px = torch.randn(64, 64, device=DEV).log_softmax(-1)
    T, H, E, K = 64, 256, 4096, 16
    hh = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
    U = torch.randn(E, H, device=DEV, dtype=torch.bfloat16)
    idx = torch.randint(0, E, (T, K), device=DEV, dtype=torch.int32)
    wt = torch.rand(T, K, device=DEV)
    aa = torch.empty(T, K, device=DEV)
    out = torch.empty_like(hh)

    class _Nop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return g

    calls = {
        "torch.empty": lambda: torch.empty(1024, device=DEV),
        "x.add_(1) (one aten kernel)": lambda: x.add_(1),
        "F.linear 256x256 bf16 (cuBLAS)": lambda: torch.nn.functional.linear(a, a),
        "autograd.Function apply (no kernel)": lambda: _Nop.apply(x),
        "Triton launch, 2 args": lambda: _tiny[(1,)](x, 1000, BLOCK=1024),
        "Triton launch, _token_forward_kernel (22 args)": lambda: kern.launch_token_forward(
            hh, U, U, wt, idx, aa, out, "silu"),
        "torch.sort int16 stable 1024 keys": lambda: torch.sort(idx.reshape(-1).to(torch.int16), stable=True),
        "omni_router fwd (custom op, N=64, k=16)": lambda: omni_router(px, px, 64, 16),
    }
    res = {}
    for name, fn in calls.items():
        for _ in range(3):
            fn()
        sync()
        ts = []
        for _ in range(30):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        sync()
        res[name] = round(statistics.median(ts) * 1e6, 1)
    return res


def main():
    global DEV, ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", default=os.path.join(ROOT, "scripts", "_profile_baseline"))
    p.add_argument("--baseline-git", metavar="REV", default=None,
                   help="build the baseline directory from git: REV's versions of "
                   + ", ".join(BASELINE_FILES))
    p.add_argument("--dry", action="store_true", help="tiny CPU cases (TRITON_INTERPRET=1)")
    p.add_argument("--cases", default=None, help="'T,H,I,E,k;...'")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--graphs-all", action="store_true", help="graph/host times at every case")
    p.add_argument("--deadline", type=float, default=165.0, help="skip optional work after this many s")
    ARGS = args = p.parse_args()
    if args.dry or not torch.cuda.is_available():
        DEV = "cpu"
    cases = DRY_CASES if DEV == "cpu" else CASES
    if args.cases:
        cases = [tuple(int(v) for v in c.split(",")) for c in args.cases.split(";")]
    import triton

    RES["env"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
                  "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    log("env", RES["env"])
    if DEV == "cuda":
        n = 2**30
        src = torch.empty(n, dtype=torch.uint8, device=DEV)
        dst = torch.empty_like(src)
        RES["copy_TBps"] = 2 * n / (bench_ms(lambda: dst.copy_(src)) * 1e-3) / 1e12
        del src, dst
        free()
        log(f"copy bandwidth {RES['copy_TBps']:.2f} TB/s")
    try:
        RES["host_costs_us"] = host_costs()
        log("host cost per call (us):", RES["host_costs_us"])
    except Exception:  # noqa: BLE001
        RES["errors"].append("host_costs: " + traceback.format_exc()[-1500:])
    base = None
    if args.baseline_git:
        args.baseline = tempfile.mkdtemp(prefix="omni_base_src_")
        for f in BASELINE_FILES:
            os.makedirs(os.path.join(args.baseline, os.path.dirname(f)), exist_ok=True)
            src = subprocess.run(["git", "-C", ROOT, "show", f"{args.baseline_git}:{f}"],
                                 capture_output=True, text=True, check=True).stdout
            with open(os.path.join(args.baseline, f), "w") as fh:
                fh.write(src)
    if os.path.isdir(args.baseline):
        try:
            base = build_baseline(args.baseline)
        except Exception:  # noqa: BLE001
            RES["errors"].append("baseline: " + traceback.format_exc()[-1500:])
            log("baseline failed:", traceback.format_exc()[-500:])
    try:
        for i, case in enumerate(cases):
            if i > 0 and elapsed() > args.deadline:
                log(f"deadline: skipping case {case}")
                continue
            try:
                new, old, inputs = run_case(case, base, args, first=(i == 0))
                if not args.no_sweep and elapsed() < args.deadline:
                    RES["cases"][-1]["variants"] = sweep(case, (new, inputs))
                    log("  expert op variants:", json.dumps(RES["cases"][-1]["variants"]))
                del new, old, inputs
            except Exception as e:  # noqa: BLE001
                RES["errors"].append(f"case {case}: {traceback.format_exc()[-2000:]}")
                log(f"case {case} FAILED: {type(e).__name__}: {str(e)[:300]}")
            free()
            save()
    finally:
        save()
        summary()


def summary():
    print("\n==== summary (ms, do_bench medians; bf16) ====")
    bw = RES.get("copy_TBps")
    for r in RES["cases"]:
        tm = r["times_ms"]
        print(f"case {tuple(r['case'])} D={r.get('distinct_experts')}")
        for name in ("layer", "expert", "reference", "router", "dense_mlp"):
            cells = []
            for tag in ("new", "old"):
                f, b = tm.get(f"{tag} {name} fwd"), tm.get(f"{tag} {name} fwd+bwd")
                if f is not None:
                    cells.append(f"{tag} {f:7.3f} / {b:7.3f}")
            print(f"  {name:10s} " + "   ".join(cells))
        for k in sorted(r["graph_ms"]):
            print(f"  graph {k}: {r['graph_ms'][k]}  host {r['host_ms'].get(k)}")
        nl, nm = tm.get("new layer fwd+bwd"), tm.get("new dense_mlp fwd+bwd")
        ne, nr = tm.get("new expert fwd+bwd"), tm.get("new reference fwd+bwd")
        if nl and nm:
            print(f"  layer/dense_mlp f+b {nl / nm:.2f}; expert speedup vs reference f+b "
                  f"{(nr / ne) if ne and nr else float('nan'):.2f}, fwd "
                  f"{tm.get('new reference fwd', 0) / tm.get('new expert fwd', 1):.2f}")
        if bw and ne:
            T, H, I, E, K = r["case"]
            D = r.get("distinct_experts") or 0
            from omni_moe.triton.omni_expert import expert_floor_bytes

            sparse = expert_floor_bytes(T, H, E, K, 2, D, backward=True, dense_weight_grads=False)
            dense = expert_floor_bytes(T, H, E, K, 2, D, backward=True)
            print(f"  expert f+b floor (touched rows) {sparse / bw / 1e9:.3f} ms -> x{ne / (sparse / bw / 1e9):.1f};"
                  f" with dense (E,H) grads {dense / bw / 1e9:.3f} ms -> x{ne / (dense / bw / 1e9):.1f}")
        for tag in ("new", "old"):
            pr = r.get(f"profile_layer_{tag}")
            if pr:
                print(f"  profile {tag}: GPU kernels {pr['gpu_kernel_us_per_step']:.0f} us/step, "
                      f"{pr['launches_per_step']:.0f} launches; "
                      + ", ".join(f"{k} {v['us']:.0f}/{v['launches']:.0f}" for k, v in pr["by_kind"].items()))
    if RES["errors"]:
        print(f"{len(RES['errors'])} error(s); first: {RES['errors'][0][-600:]}")


if __name__ == "__main__":
    main()
