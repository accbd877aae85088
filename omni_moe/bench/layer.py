"""Benchmark of the whole OmniMoE layer and its parts (``omni-moe bench layer``).

For each case (T tokens, hidden H, intermediate I, experts E, k per token) it times, with
``triton.testing.do_bench`` medians (which flush L2 before every timed call), forward and
forward+backward of:

    layer      omni_moe.OmniMoE: router + atomic experts + shared SwiGLU MLP
    router     the layer's routing alone: gate GEMMs, BatchNorm, log_softmax, omni_router
               (with the rest, it says where the layer's time goes)
    expert     omni_moe.omni_expert alone, on the layer's own routing
    reference  the token-centric PyTorch expert path (gathers u[idx], v[idx] into
               (T, k, H) tensors; omni_moe.layers.reference.expert_reference), same inputs
    dense_mlp  the shared SwiGLU MLP alone (3 cuBLAS GEMMs + fused activation)

"forward" runs under ``torch.no_grad()``; "fwd+bwd" is a training step of the variant
(forward with autograd, backward of a random output gradient; gradients of the input and
of every weight, reset to None before each call as a training step would find them).

Before timing, the expert path is checked against a float32 token-centric oracle on the
same inputs (output and all four gradients, on the rows of the experts used).

Also reported: peak extra memory of one call of each variant, the expert path's HBM
floor -- bytes that must move at the copy bandwidth measured on this device:
    forward   D*2*H*b (u, v rows of the D distinct experts touched, counted from the
              actual indices) + 2*T*H*b (read h, write out) + T*k*(4 + 4) (indices, weights)
    backward  D*2*H*b (read u, v) + D*2*H*b (write du, dv rows) + 3*T*H*b (h, dout, dh)
              + T*k*(4 + 4 + 4) (indices, weights, dw)
    dense     the same plus 2*(E-D)*H*b: the zero rows of the dense (E, H) gradients that
              autograd's parameter gradients require (8 GiB at E = 2^20, H = 2048)
-- and the ratios: speedup of the expert path over the reference, expert time / floor, and
layer fwd+bwd / dense MLP fwd+bwd (what the experts cost on top of the shared MLP).

Without CUDA it times tiny cases on CPU (PyTorch paths) and says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

import torch

DEFAULT_CASES = [
    (4096, 1024, 4096, 4096, 16),
    (8192, 1024, 4096, 65536, 32),
    (4096, 2048, 8192, 1048576, 16),
]
CPU_CASES = [
    (256, 64, 128, 256, 4),
    (512, 64, 128, 1024, 8),
]
VARIANTS = ("layer", "router", "expert", "reference", "dense_mlp")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CHECK_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _parse_case(s: str):
    try:
        vals = tuple(int(v) for v in s.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--case wants T,H,I,E,K integers, got {s!r}")
    if len(vals) != 5 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--case wants five positive integers T,H,I,E,K, got {s!r}")
    T, H, I, E, K = vals
    if math.isqrt(E) ** 2 != E:
        raise argparse.ArgumentTypeError(f"--case: E={E} is not a perfect square")
    if K > E:
        raise argparse.ArgumentTypeError(f"--case: K={K} > E={E}")
    return vals


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``omni-moe bench layer`` (also ``python -m omni_moe.bench.layer``)."""
    parser.add_argument("--case", action="append", type=_parse_case, metavar="T,H,I,E,K",
                        help="a case to run (repeatable); default: "
                        + "; ".join(",".join(map(str, c)) for c in DEFAULT_CASES)
                        + " on CUDA, tiny cases on CPU")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--act", choices=("silu", "gelu", "relu"), default="silu")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check")
    parser.add_argument("--json", metavar="PATH", help="write all rows and the environment here")
    parser.add_argument("--seed", type=int, default=0)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e)


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device) -> float | None:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    if device.type != "cuda":
        return None
    import triton.testing

    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    del src, dst
    _free()
    return 2 * n / (ms * 1e-3)


def expert_floor_bytes(T, H, K, D, b, E=None):
    """(forward, forward+backward, forward+backward with dense (E, H) weight gradients)."""
    fwd = D * 2 * H * b + 2 * T * H * b + T * K * 8
    bwd = D * 4 * H * b + 3 * T * H * b + T * K * 12
    dense = fwd + bwd + (2 * (E - D) * H * b if E is not None else 0)
    return fwd, fwd + bwd, dense


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


def check_expert(h, up, down, w, idx, act, dtype):
    """Expert path vs a float32 token-centric oracle on the rows of the experts used.

    The oracle differentiates w.r.t. float32 copies of only the D used rows, so it needs
    O(T*k*H) memory even at E = 2^20.  Returns {quantity: rel L2}, plus the norm of
    up/down gradients outside the used rows (must be exactly 0).
    """
    from omni_moe import omni_expert
    from omni_moe.layers.reference import expert_reference

    uniq, inv = torch.unique(idx.long(), return_inverse=True)
    hh = h.detach().clone().requires_grad_()
    uu = up.detach().clone().requires_grad_()
    dd = down.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    out = omni_expert(hh, uu, dd, ww, idx, act)
    gout = torch.randn_like(out)
    out.backward(gout)

    h32 = h.detach().float().requires_grad_()
    u32 = up.detach()[uniq].float().requires_grad_()
    v32 = down.detach()[uniq].float().requires_grad_()
    w32 = w.detach().float().requires_grad_()
    ref = expert_reference(h32, u32, v32, w32, inv, act)
    ref.backward(gout.float())
    res = {
        "out": _rel(out, ref),
        "d_hidden": _rel(hh.grad, h32.grad),
        "d_up_used_rows": _rel(uu.grad[uniq], u32.grad),
        "d_down_used_rows": _rel(dd.grad[uniq], v32.grad),
        "d_routing_weights": _rel(ww.grad, w32.grad),
    }
    # Rows of unused experts must get exactly zero gradient.  Zero the used rows in place
    # and scan in chunks: a boolean mask over (E, H) would copy gigabytes at E = 2^20.
    outside = 0.0
    for g in (uu.grad, dd.grad):
        g[uniq] = 0
        outside = max([outside] + [float(c.abs().max()) for c in g.split(65536) if c.numel()])
    res["unused_rows_grad_abs_max"] = outside
    res["pass"] = (max(v for k, v in res.items() if k.startswith(("out", "d_"))) <= CHECK_TOL[dtype]
                   and res["unused_rows_grad_abs_max"] == 0.0)
    return res


def _measure(fn, device, warmup_ms, rep_ms, grad_to_none):
    """(median ms, peak extra bytes of one call or None)."""
    from omni_moe.bench.common import median_ms

    def call():
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        fn()

    peak = None
    if device.type == "cuda":
        call()
        _sync()
        for t in grad_to_none or ():
            t.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync()
        peak = torch.cuda.max_memory_allocated() - base
        import triton.testing

        ms = float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                           grad_to_none=grad_to_none, return_mode="median"))
    else:
        ms = median_ms(call, warmup_ms, rep_ms)
    for t in grad_to_none or ():
        t.grad = None
    return ms, peak


def run_case(case, dtype, act, variants, device, args, bw, label):
    from omni_moe import OmniMoE, OmniMoEConfig, omni_expert
    from omni_moe.ops import swiglu_mlp
    from omni_moe.layers.reference import expert_reference

    T, H, I, E, K = case
    b = torch.finfo(dtype).bits // 8
    row = {"T": T, "hidden": H, "intermediate": I, "experts": E, "k": K, "dtype": str(dtype).replace("torch.", ""),
           "act": act, "times_ms": {}, "peak_mem_MiB": {}, "errors": {}}
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    cfg = OmniMoEConfig(hidden_size=H, intermediate_size=I, hidden_act=act, num_experts=E,
                        num_experts_per_token=K)
    with torch.device(device):
        layer = OmniMoE(cfg)
    layer = layer.to(dtype)
    _free()
    h = torch.randn(T, H, device=device, dtype=dtype)
    gout = torch.randn(T, H, device=device, dtype=dtype)
    # first call of a training step at this shape: Triton compilation included
    _sync()
    t1 = time.perf_counter()
    layer(h.detach().requires_grad_()).backward(gout)
    _sync()
    row["first_call_s"] = time.perf_counter() - t1
    layer.zero_grad(set_to_none=True)
    with torch.no_grad():
        scores, idx = layer.route(h)
    w = scores.exp()
    D = int(torch.unique(idx).numel())
    row["distinct_experts"] = D
    _say(f"{label} set up in {time.perf_counter() - t0:.1f} s (first training step of the layer "
         f"{row['first_call_s']:.2f} s); {D} distinct experts of {E} "
         f"({D / E:.1%}), {T * K} (token, expert) pairs")

    if not args.no_check:
        res = check_expert(h, layer.up_embed.weight, layer.down_embed.weight, w, idx, act, dtype)
        row["check"] = res
        _say(f"{label} check expert path vs float32 oracle: "
             + ", ".join(f"{k} {v:.2e}" for k, v in res.items() if k.startswith(("out", "d_")))
             + f"; unused rows' grad max {res['unused_rows_grad_abs_max']}: "
             + ("PASS" if res["pass"] else "FAIL"))
        _free()

    params = list(layer.parameters())
    U, V = layer.up_embed.weight, layer.down_embed.weight
    Wg, Wu, Wd = layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight
    h_req = h.detach().clone().requires_grad_()
    w_req = w.detach().clone().requires_grad_()

    def fb(fn, leaves):
        def step():
            fn().backward(gout)
        return step, leaves

    gs = torch.randn(T, K, device=device, dtype=torch.float32)
    router_leaves = [h_req, layer.router_gate_x.weight, layer.router_gate_y.weight]

    def router_step():
        layer.route(h_req)[0].backward(gs)

    plans = {
        "layer": (lambda: layer(h), *fb(lambda: layer(h_req), [h_req] + params)),
        "router": (lambda: layer.route(h), router_step, router_leaves),
        "expert": (lambda: omni_expert(h, U, V, w, idx, act),
                   *fb(lambda: omni_expert(h_req, U, V, w_req, idx, act), [h_req, U, V, w_req])),
        "reference": (lambda: expert_reference(h, U, V, w, idx, act),
                      *fb(lambda: expert_reference(h_req, U, V, w_req, idx, act), [h_req, U, V, w_req])),
        "dense_mlp": (lambda: swiglu_mlp(h, Wg, Wu, Wd, act),
                      *fb(lambda: swiglu_mlp(h_req, Wg, Wu, Wd, act), [h_req, Wg, Wu, Wd])),
    }
    for name in variants:
        fwd, step, leaves = plans[name]
        for mode in ("fwd", "fwd+bwd"):
            key = f"{name} {mode}"
            try:
                if mode == "fwd":
                    def fn(fwd=fwd):
                        with torch.no_grad():
                            fwd()
                    grads = None
                else:
                    fn, grads = step, leaves
                ms, peak = _measure(fn, device, args.warmup_ms, args.rep_ms, grads)
                row["times_ms"][key] = ms
                row["peak_mem_MiB"][key] = None if peak is None else peak / 2**20
                mem = "" if peak is None else f", peak +{peak / 2**20:,.0f} MiB"
                _say(f"{label} {key:20s} {ms:9.3f} ms{mem}")
            except Exception as e:  # noqa: BLE001 -- OOM of a variant is a result, not a crash
                if not _is_oom(e):
                    raise
                row["times_ms"][key] = None
                row["errors"][key] = "out of memory"
                _say(f"{label} {key:20s} out of memory ({str(e).splitlines()[0][:120]})")
            finally:
                for t in (leaves or []):
                    t.grad = None
                _free()

    fwd_bytes, fb_bytes, dense_bytes = expert_floor_bytes(T, H, K, D, b, E)
    row["expert_floor_bytes"] = {"fwd": fwd_bytes, "fwd+bwd": fb_bytes, "fwd+bwd dense grads": dense_bytes}
    tm = row["times_ms"]
    ratios = {}
    for mode in ("fwd", "fwd+bwd"):
        e, r = tm.get(f"expert {mode}"), tm.get(f"reference {mode}")
        if e and r:
            ratios[f"expert speedup vs reference {mode}"] = r / e
        if bw and e:
            floor_ms = (fwd_bytes if mode == "fwd" else fb_bytes) / bw * 1e3
            row.setdefault("expert_floor_ms", {})[mode] = floor_ms
            ratios[f"expert x-floor {mode}"] = e / floor_ms
            if mode == "fwd+bwd":
                dense_ms = dense_bytes / bw * 1e3
                row["expert_floor_ms"]["fwd+bwd dense grads"] = dense_ms
                ratios["expert x-floor fwd+bwd dense grads"] = e / dense_ms
    lf, mf = tm.get("layer fwd+bwd"), tm.get("dense_mlp fwd+bwd")
    if lf and mf:
        ratios["layer / dense_mlp fwd+bwd"] = lf / mf
    row["ratios"] = ratios
    del layer, params, U, V, Wg, Wu, Wd, plans, h, gout, h_req, w_req, scores, idx, w, gs, router_leaves
    _free()
    return row


def _table(rows, bw):
    lines = []
    hdr = (f"{'T':>5} {'H':>5} {'I':>5} {'E':>8} {'k':>3} {'D':>7} | "
           + " ".join(f"{v[:9] + ' ' + m:>16}" for v in VARIANTS for m in ("fwd", "f+b"))
           + " | floor f/f+b | xfloor f/f+b | x dense-grad floor | vs ref f/f+b | layer/mlp")
    lines.append(hdr)
    for r in rows:
        tm = r["times_ms"]

        def fmt(v):
            return f"{v:16.3f}" if isinstance(v, float) else f"{('OOM' if v is None else '-'):>16}"

        cells = " ".join(fmt(tm.get(f"{v} {m}", "-")) for v in VARIANTS for m in ("fwd", "fwd+bwd"))
        fl = r.get("expert_floor_ms", {})
        ra = r["ratios"]

        def pair(a, b, spec):
            return "/".join(("-" if x is None else format(x, spec)) for x in (a, b))

        lines.append(
            f"{r['T']:>5} {r['hidden']:>5} {r['intermediate']:>5} {r['experts']:>8} {r['k']:>3} "
            f"{r['distinct_experts']:>7} | {cells} | "
            f"{pair(fl.get('fwd'), fl.get('fwd+bwd'), '.3f'):>11} | "
            f"{pair(ra.get('expert x-floor fwd'), ra.get('expert x-floor fwd+bwd'), '.1f'):>12} | "
            f"{ra.get('expert x-floor fwd+bwd dense grads', float('nan')):>18.1f} | "
            f"{pair(ra.get('expert speedup vs reference fwd'), ra.get('expert speedup vs reference fwd+bwd'), '.1f'):>12} | "
            f"{ra.get('layer / dense_mlp fwd+bwd', float('nan')):.2f}")
    lines.append("x dense-grad floor: expert fwd+bwd / (floor + the 2*(E-D)*H*b bytes of zero rows that "
                 "dense (E, H) weight gradients must also write)")
    lines.append("times in ms (median); floor = expert path HBM bytes / measured copy bandwidth"
                 + (f" {bw / 1e12:.2f} TB/s" if bw else " (n/a on CPU)"))
    return "\n".join(lines)


def run(args) -> int:
    """Run the benchmark; returns a process exit code (1 if a correctness check failed)."""
    from omni_moe.bench.common import environment, warm_up_triton

    dtype = _DTYPES[args.dtype]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            print(f"--variants: unknown variant {v!r} (choose from {', '.join(VARIANTS)})", file=sys.stderr)
            return 2
    if torch.cuda.is_available():
        device = torch.device("cuda")
        cases = args.case or DEFAULT_CASES
        _say(f"device: {torch.cuda.get_device_name()}; dtype {args.dtype}; {len(cases)} case(s)")
        warm_up_triton()
    else:
        device = torch.device("cpu")
        cases = args.case or CPU_CASES
        interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        _say("CUDA is not available: timing tiny cases on CPU "
             + ("through the Triton interpreter (meaningless as kernel timings)" if interp
                else "(PyTorch paths, not the Triton kernels)")
             + f"; dtype {args.dtype}")
    bw = copy_bandwidth(device)
    if bw:
        _say(f"measured device-to-device copy bandwidth: {bw / 1e12:.2f} TB/s")
    rows = []
    ok = True
    for i, case in enumerate(cases):
        label = f"[{i + 1}/{len(cases)} T={case[0]} H={case[1]} I={case[2]} E={case[3]} k={case[4]}]"
        try:
            row = run_case(case, dtype, args.act, variants, device, args, bw, label)
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            _say(f"{label} out of memory while setting up the case; skipped")
            rows.append({"T": case[0], "hidden": case[1], "intermediate": case[2], "experts": case[3],
                         "k": case[4], "errors": {"setup": "out of memory"}})
            _free()
            continue
        ok = ok and row.get("check", {}).get("pass", True)
        rows.append(row)
    done = [r for r in rows if "times_ms" in r]
    if done:
        _say("\n" + _table(done, bw))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "copy_bandwidth_Bps": bw, "rows": rows}, f, indent=1)
        _say(f"wrote {args.json}")
    if not ok:
        _say("a correctness check FAILED (see above)")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m omni_moe.bench.layer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
