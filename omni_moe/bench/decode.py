"""``omni-moe bench decode``: the OmniMoE layer serving, beside dense MLPs.

A decode step of a served model runs one layer on T = 1 to 64 tokens (one per request
in the batch); a prefill runs it on the prompt's hundreds to thousands.  For each case
(hidden H, shared intermediate I, experts E, k per token) and each T of ``--tokens`` it
times one inference call (``eval()``, ``torch.inference_mode``) of:

    layer       omni_moe.OmniMoE: router + atomic experts + shared SwiGLU MLP
    shared_mlp  the layer's shared SwiGLU MLP alone (its own weights): what the
                experts and the router add on top of it is layer - shared_mlp
    dense       a dense SwiGLU MLP of the layer's active parameters: one token uses
                3*H*I + 2*N*H (router gates) + 2*k*H (k experts' u and v rows), so
                I_dense = I + (2*N + 2*k) / 3, rounded to the nearest integer
    dense_ref   a dense SwiGLU MLP of a fixed width (``--dense-intermediate``, default
                4096 on CUDA): the same reference model for every case

Per variant and T:
  eager us    median of one call (on CUDA: CUDA events, an L2 flush before every call
              as ``triton.testing.do_bench`` does, so weights and inputs come from HBM
              as in a model whose other layers evicted them; on CPU: wall time)
  graph us    the same call captured once in a CUDA graph and replayed, timed the same
              way (CUDA only; '-' with a footnote where capture fails)
  host us     CPU time of issuing one eager call: the device idle before, the clock
              stopped when the call returns (CUDA only)
  launches    kernels, memsets and copies of one eager call, counted with
              torch.profiler (CUDA only; --no-launches skips it)
and the ratios layer / dense (eager and graph): the issue a served OmniMoE model has
with a dense one of the same active parameters.

Floor: the bytes a call must read and write at least -- the layer's weights that its
routing of the timed tokens touches (shared MLP, both router gates, a u and a v row of
each *distinct* expert the T tokens chose) and the dense MLP's weights, plus the input
and output rows -- and, on CUDA, those bytes at the device-to-device copy bandwidth
measured once per run ('floor us').  Equal active parameters per token are not equal
bytes per step: T tokens share the dense weights but reach up to T * k distinct
experts, so from a few tokens on the layer's floor alone can exceed a dense call.

Check before timing: the layer's output of the timed call, on its first few tokens,
against a float64 token-centric twin of the layer (``OmniMoEReference``) forced onto the
layer's own routing; 'ok' says whether the relative L2 error is within ``CHECK_TOL``.

Without CUDA it times small cases on CPU (PyTorch paths, or Triton kernels through the
interpreter under ``TRITON_INTERPRET=1``, whose times mean nothing) and says so.

--json saves the rows and the environment after every case; --from-json reprints (and
--plot redraws) a saved run without running anything.  Exit status 1 if a check or a
variant fails, 2 on bad arguments (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from . import common

DEFAULT_CASES = [
    (1024, 4096, 4096, 16),      # the README's layer
    (1024, 2048, 65536, 3072),   # about the active parameters of a dense I = 4096
    (1024, 1024, 102400, 512),   # the OmniMoE paper's setting
]
CPU_CASES = [(64, 128, 256, 4), (64, 64, 1024, 16)]
DEFAULT_TOKENS = (1, 8, 64, 512, 1024, 2048, 4096)
CPU_TOKENS = (1, 8, 64, 256)
# A step of at most this many tokens is a decode step; above, a prefill.
DECODE_MAX_TOKENS = 64
DENSE_REF_I = 4096
CPU_DENSE_REF_I = 256
VARIANTS = ("layer", "shared_mlp", "dense", "dense_ref")
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# (token, expert) pairs the check takes at most: the float64 twin gathers (n, k, H) rows.
CHECK_PAIRS = 2**15


def check_case(case):
    H, I, E, K = case
    if min(case) < 1:
        return "need four positive integers"
    if math.isqrt(E) ** 2 != E:
        return f"E={E} is not a perfect square"
    if K > E:
        return f"k={K} > E={E}"
    return None


def parse_tokens(text: str):
    """--tokens: '1,8,64' -> (1, 8, 64)."""
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        vals = ()
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return vals


def _dense_width(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``omni-moe bench decode``."""
    common.add_common_arguments(
        parser, ("H", "I", "E", "k"), check_case,
        "'" + ";".join(",".join(map(str, c)) for c in DEFAULT_CASES) + "' on CUDA, small cases on CPU")
    parser.add_argument("--tokens", type=parse_tokens, default=None, metavar="T,T",
                        help="tokens per call, comma-separated (default "
                        f"{','.join(map(str, DEFAULT_TOKENS))} on CUDA: decode batches up to "
                        f"{DECODE_MAX_TOKENS}, prefills above; {','.join(map(str, CPU_TOKENS))} on CPU)")
    parser.add_argument("--dense-intermediate", type=_dense_width, default=None, metavar="I",
                        help=f"width of the dense_ref MLP (default {DENSE_REF_I} on CUDA, "
                        f"{CPU_DENSE_REF_I} on CPU)")
    parser.add_argument("--router-norm", choices=("batchnorm", "layernorm", "none"), default="batchnorm",
                        help="the layer's router norm (default batchnorm, which uses its running "
                        "statistics in eval)")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph replays (CUDA only)")
    parser.add_argument("--no-launches", action="store_true",
                        help="skip counting launches with torch.profiler (CUDA only)")


def check_arguments(args) -> None:
    """Everything wrong that is knowable before any work (UsageError)."""
    common.check_run_arguments(args)
    if args.from_json:
        for option, value in (("--tokens", args.tokens), ("--dense-intermediate", args.dense_intermediate)):
            if value is not None:
                raise common.UsageError(f"{option} cannot be combined with --from-json "
                                        "(a saved run is reprinted as it was)")


def active_params(H, I, E, K) -> int:
    """Parameters one token uses: the shared MLP, the two router gates, its k experts."""
    return 3 * H * I + 2 * math.isqrt(E) * H + 2 * K * H


def dense_intermediate(H, I, E, K) -> int:
    """Width of the dense SwiGLU MLP (3*H*I_dense parameters) nearest ``active_params``."""
    return round(active_params(H, I, E, K) / (3 * H))


def floor_bytes(H, I, E, K, T, distinct, elem_bytes) -> dict:
    """{"layer", "dense"}: bytes one inference call reads and writes at least, with
    ``distinct`` experts touched by the call's routing and weights of ``elem_bytes``."""
    n = math.isqrt(E)
    rows = 2 * T * H   # input and output rows
    return {"layer": elem_bytes * (3 * H * I + 2 * n * H + 2 * distinct * H + rows),
            "dense": elem_bytes * (3 * H * dense_intermediate(H, I, E, K) + rows)}


def _say(msg: str) -> None:
    print(msg, flush=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


def check_step(layer, oracle, h, dtype):
    """The layer's inference output on ``h`` (its first tokens) against the float64 twin
    on the layer's own routing: {"tokens", "out" (rel L2), "finite", "pass"}."""
    n = max(1, min(h.shape[0], CHECK_PAIRS // layer.top_k))
    with torch.inference_mode():
        out, (_, idx) = layer(h, return_routing=True)
        ref = oracle(h[:n].double(), indices=idx[:n])
    res = {"tokens": n, "out": _rel(out[:n], ref), "finite": bool(torch.isfinite(out).all())}
    res["pass"] = res["finite"] and res["out"] <= CHECK_TOL[dtype]
    return res


def _graph_ms(fn, warmup_ms, rep_ms) -> float:
    """Median ms of replaying a CUDA graph of one call of ``fn`` (warmed up on a side
    stream first, as whole-network capture does)."""
    graph = common.capture_graph(fn)
    torch.cuda.synchronize()
    return common.median_ms(graph.replay, warmup_ms, rep_ms)


def build_models(case, dtype, device, dense_ref_i, router_norm, seed):
    """{variant: module} in eval mode, ``dtype``, on ``device``; the layer's router norms'
    running statistics moved off their initial values by a few training batches."""
    from omni_moe import OmniMoE, OmniMoEConfig

    H, I, E, K = case
    torch.manual_seed(seed)
    cfg = OmniMoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_token=K,
                        router_norm=router_norm)
    with torch.device(device):
        layer = OmniMoE(cfg)
        dense = common.DenseMLP(H, dense_intermediate(*case))
        dense_ref = common.DenseMLP(H, dense_ref_i)
        shared = common.DenseMLP(1, 1)
    layer.to(dtype)
    with torch.no_grad():
        for _ in range(2):
            layer(torch.randn(64, H, device=device, dtype=dtype))
    # The layer's own shared MLP, as a module of its own.
    shared.gate_proj, shared.up_proj, shared.down_proj = layer.gate_proj, layer.up_proj, layer.down_proj
    models = {"layer": layer, "shared_mlp": shared, "dense": dense.to(dtype), "dense_ref": dense_ref.to(dtype)}
    for m in models.values():
        m.eval()
    return models


def run_case(case, tokens, dtype, device, args, label, env, dense_ref_i, bandwidth=None):
    """Rows (one per T of ``tokens``) of one case; ``bandwidth``: bytes/s for the floor
    (None: bytes only)."""
    from omni_moe.layers.reference import OmniMoEReference

    H, I, E, K = case
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    models = build_models(case, dtype, device, dense_ref_i, args.router_norm, args.seed)
    oracle = None
    if not args.no_check:
        with torch.device(device):
            oracle = OmniMoEReference.from_module(models["layer"], torch.float64)
    _say(f"{label} set up in {time.perf_counter() - t0:.1f} s")
    rows = []
    for T in tokens:
        row = {"hidden": H, "intermediate": I, "experts": E, "k": K, "T": T,
               "phase": "decode" if T <= DECODE_MAX_TOKENS else "prefill",
               "dtype": str(dtype).replace("torch.", ""), "router_norm": args.router_norm,
               "dense_intermediate": dense_intermediate(*case), "dense_ref_intermediate": dense_ref_i,
               "active_params": active_params(*case),
               "dense_active_params": 3 * H * dense_intermediate(*case),
               "gpu": env.get("gpu"), "torch": env.get("torch"), "triton": env.get("triton"),
               "eager_us": {}, "graph_us": {}, "host_us": {}, "launches": {}, "errors": {}}
        h = torch.randn(T, H, device=device, dtype=dtype)
        where = f"{label} T={T}"
        with torch.inference_mode():
            distinct = int(models["layer"](h, return_routing=True)[1][1].unique().numel())
        row["distinct_experts"] = distinct
        row["floor_bytes"] = floor_bytes(H, I, E, K, T, distinct, dtype.itemsize)
        row["floor_us"] = ({v: b / bandwidth * 1e6 for v, b in row["floor_bytes"].items()} if bandwidth else {})
        if oracle is not None:
            res = check_step(models["layer"], oracle, h, dtype)
            row["check"] = res
            _say(f"{where} check layer vs float64 twin on {res['tokens']} token(s): rel L2 {res['out']:.2e}: "
                 + ("PASS" if res["pass"] else "FAIL"))
        for name in VARIANTS:
            module = models[name]

            def fn(module=module):
                with torch.inference_mode():
                    return module(h)

            try:
                us = common.median_ms(fn, args.warmup_ms, args.rep_ms) * 1e3
                row["eager_us"][name] = us
                extra = ""
                if cuda:
                    row["host_us"][name] = common.host_ms(fn) * 1e3
                    extra += f", host {row['host_us'][name]:.1f} us"
                    if not args.no_launches:
                        row["launches"][name] = common.cuda_launches(fn)
                        extra += f", {row['launches'][name]} launches"
                    if not args.no_graphs:
                        try:
                            row["graph_us"][name] = _graph_ms(fn, args.warmup_ms, args.rep_ms) * 1e3
                            extra += f", graph {row['graph_us'][name]:.1f} us"
                        except Exception as e:  # noqa: BLE001 -- a capture failure is a result
                            row["graph_us"][name] = None
                            row["errors"][f"{name} graph"] = _first_line(e)
                            extra += f", graph capture failed ({_first_line(e)})"
                            try:
                                torch.cuda.synchronize()
                            except Exception:  # noqa: BLE001 -- recorded above
                                pass
                _say(f"{where} {name:10s} {us:10.1f} us{extra}")
            except Exception as e:  # noqa: BLE001 -- a variant that fails is a result, not a crash
                row["eager_us"][name] = None
                row["errors"][name] = _first_line(e)
                row["failed"] = True
                _say(f"{where} {name:10s} {row['errors'][name]}")
        ratios = {}
        for d, tag in (("eager_us", "eager"), ("graph_us", "graph")):
            lay, den = row[d].get("layer"), row[d].get("dense")
            if lay and den:
                ratios[f"layer / dense {tag}"] = lay / den
        row["ratios"] = ratios
        row["date"] = common.utc_now()
        rows.append(row)
        del h
    del models, oracle
    if cuda:
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- report
def _us(row, name, gpu):
    e = (row.get("eager_us") or {}).get(name)
    if not gpu:
        return "-" if e is None else f"{e:.1f}"
    g = (row.get("graph_us") or {}).get(name)
    return f"{'-' if e is None else f'{e:.1f}'} / {'-' if g is None else f'{g:.1f}'}"


def _ratio(row, gpu):
    r = row.get("ratios") or {}
    e, g = r.get("layer / dense eager"), r.get("layer / dense graph")
    text = "-" if e is None else f"{e:.2f}"
    return f"{text} / {'-' if g is None else f'{g:.2f}'}" if gpu else text


def _ok(row):
    c = row.get("check")
    return "-" if c is None else ("yes" if c["pass"] else "NO")


def _count(d, name):
    v = (d or {}).get(name)
    return "-" if v is None else format(v, "d" if isinstance(v, int) else ".1f")


def _floor(row, key, scale, fmt):
    d = row.get(key) or {}
    if d.get("layer") is None or d.get("dense") is None:
        return "-"
    return f"{d['layer'] * scale:{fmt}} / {d['dense'] * scale:{fmt}}"


def format_table(rows, gpu: bool) -> str:
    """Markdown table, one line per (case, T); CUDA cells read 'eager / graph'."""
    head = ["H", "I", "E", "k", "T", "phase", "ok", "layer us", "shared_mlp us", "I dense", "dense us",
            "I ref", "dense_ref us", "layer / dense", "distinct experts", "floor MB layer / dense"]
    if gpu:
        head += ["floor us layer / dense", "launches layer", "launches dense", "host us layer", "host us dense"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if c in ("phase", "ok") else "---:" for c in head) + "|"]
    notes = []
    for r in rows:
        cells = [r["hidden"], r["intermediate"], r["experts"], r["k"], r["T"], r["phase"], _ok(r),
                 _us(r, "layer", gpu), _us(r, "shared_mlp", gpu), r["dense_intermediate"], _us(r, "dense", gpu),
                 r["dense_ref_intermediate"], _us(r, "dense_ref", gpu), _ratio(r, gpu),
                 r.get("distinct_experts", "-"), _floor(r, "floor_bytes", 1e-6, ".2f")]
        if gpu:
            cells += [_floor(r, "floor_us", 1.0, ".1f"),
                      _count(r.get("launches"), "layer"), _count(r.get("launches"), "dense"),
                      _count(r.get("host_us"), "layer"), _count(r.get("host_us"), "dense")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        for key, why in (r.get("errors") or {}).items():
            notes.append(f"H={r['hidden']} E={r['experts']} k={r['k']} T={r['T']} {key}: {why}")
    return "\n".join(lines + [f"  {n}" for n in notes])


def _report(result, plot_path=None) -> None:
    env = result.get("environment") or {}
    gpu = result["mode"] == "cuda"
    rows = result["rows"]
    where = env.get("gpu") or f"CPU ({result['mode']})"
    lines = [f"omni-moe decode, {where}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"{env.get('date')}; {result['settings']['dtype']}, eval + inference_mode, one call per "
             "step; times in us, medians",
             format_table(rows, gpu),
             "dense: a dense SwiGLU MLP of the layer's active parameters (3*H*I dense = 3*H*I + 2*N*H + 2*k*H); "
             "dense_ref: a dense MLP of width 'I ref'; ok: the layer vs its float64 twin on its own routing",
             "floor: bytes a call moves at least (the layer: shared MLP, router gates, u and v rows of the "
             "distinct experts its routing of these tokens touches; input and output rows)"
             + (f", in us at the measured copy bandwidth {result['copy_bandwidth_Bps'] / 1e12:.2f} TB/s"
                if result.get("copy_bandwidth_Bps") else "")]
    if gpu:
        lines.append("cells 'eager / graph': one eager call / the same call replayed from a CUDA graph; launches: "
                     "kernels, memsets and copies of one eager call; host: CPU time of issuing one eager call")
    else:
        lines.append("CPU wall times (no CUDA device)" + (
            "; Triton kernels through the interpreter: their times mean nothing"
            if result["mode"] == "cpu-interpret" else ", PyTorch paths"))
    threads = env.get("cpu_threads")
    if threads:
        lines.append("CPU threads: " + common.describe_threads(threads)
                     + (" -- OVERSUBSCRIBED: CPU-side times are slow and noisy" if threads["oversubscribed"] else ""))
    print("\n".join(lines), flush=True)
    if plot_path:
        plot(rows, plot_path, f"omni-moe decode, {where}, {str(env.get('date'))[:10]}", gpu)
        print(f"wrote {plot_path}")


def plot(rows, path, title, gpu: bool) -> None:
    """One panel per case: time per call against T (log-log), a line per variant, eager
    solid and CUDA graph dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["hidden"], r["intermediate"], r["experts"], r["k"]) for r in rows))
    fig, axes = plt.subplots(1, max(1, len(cases)), figsize=(5 * max(1, len(cases)), 4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        mine = sorted((r for r in rows if (r["hidden"], r["intermediate"], r["experts"], r["k"]) == case),
                      key=lambda r: r["T"])
        for j, name in enumerate(VARIANTS):
            color = f"C{j}"
            for key, style in (("eager_us", "-"), ("graph_us", "--")):
                pts = [(r["T"], (r.get(key) or {}).get(name)) for r in mine]
                pts = [(t, v) for t, v in pts if v]
                if pts:
                    ax.plot(*zip(*pts), style, color=color, marker="o", ms=3,
                            label=f"{name}{' graph' if key == 'graph_us' else ''}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens per call")
        ax.set_ylabel("us per call")
        ax.set_title(f"H={case[0]} I={case[1]} E={case[2]} k={case[3]}", fontsize="small")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="x-small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _looks_like_decode_run(data) -> bool:
    return (data.get("benchmark") == "decode" and isinstance(data.get("settings"), dict)
            and all({"hidden", "intermediate", "experts", "k", "T"} <= r.keys() for r in data["rows"]))


def run(args) -> int:
    """Run the benchmark; returns a process exit code (1 if a check or a variant failed)."""
    from omni_moe.ops._dispatch import interpret_mode

    check_arguments(args)
    if common.report_saved(args, "decode", _looks_like_decode_run, _report):
        return 0
    dtype = common.TORCH_DTYPES[args.dtype]
    cuda = torch.cuda.is_available()
    mode = "cuda" if cuda else ("cpu-interpret" if interpret_mode() else "cpu")
    cases = args.cases or (DEFAULT_CASES if cuda else CPU_CASES)
    tokens = args.tokens or (DEFAULT_TOKENS if cuda else CPU_TOKENS)
    dense_ref_i = args.dense_intermediate or (DENSE_REF_I if cuda else CPU_DENSE_REF_I)
    if cuda:
        device = torch.device("cuda")
        _say(f"device: {torch.cuda.get_device_name()}; dtype {args.dtype}; {len(cases)} case(s), "
             f"T = {','.join(map(str, tokens))}")
        common.warm_up_triton()
        from .layer import copy_bandwidth

        bandwidth = copy_bandwidth(device)
    else:
        bandwidth = None
        device = torch.device("cpu")
        _say("CUDA is not available: timing small cases on CPU "
             + ("through the Triton interpreter (meaningless as kernel timings)" if mode == "cpu-interpret"
                else "(PyTorch paths, not the Triton kernels)") + f"; dtype {args.dtype}")
    rows = []
    env = common.environment()
    result = {"benchmark": "decode", "mode": mode, "environment": env,
              "settings": {"dtype": args.dtype, "router_norm": args.router_norm, "tokens": list(tokens),
                           "dense_ref_intermediate": dense_ref_i, "warmup_ms": args.warmup_ms,
                           "rep_ms": args.rep_ms, "min_samples": common.MIN_SAMPLES, "seed": args.seed,
                           "graphs": cuda and not args.no_graphs, "launches": cuda and not args.no_launches},
              "copy_bandwidth_Bps": bandwidth, "rows": rows}
    ok = True
    for i, case in enumerate(cases):
        label = f"[{i + 1}/{len(cases)} H={case[0]} I={case[1]} E={case[2]} k={case[3]}]"
        new = run_case(case, tokens, dtype, device, args, label, env, dense_ref_i, bandwidth)
        ok = ok and all(r.get("check", {}).get("pass", True) and not r.get("failed") for r in new)
        rows.extend(new)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    _say("")
    _report(result, args.plot)
    if args.json:
        _say(f"wrote {args.json}")
    if not ok:
        print("FAILED: a correctness check or a variant failed (see the lines above)", file=sys.stderr)
    return 0 if ok else 1
