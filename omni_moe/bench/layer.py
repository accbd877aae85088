"""``omni-moe bench layer``: the whole OmniMoE layer, its parts and its PyTorch peers.

For each case (T tokens, hidden H, intermediate I, experts E, k per token) it times
forward and forward+backward (medians of at least 10 timed calls after warm-up; on CUDA
timed with CUDA events after an L2 flush, as ``triton.testing.do_bench`` does) of:

    layer        omni_moe.OmniMoE: router + atomic experts + shared SwiGLU MLP
    router       the layer's routing alone: gate GEMMs, BatchNorm, log_softmax, omni_router
                 (with the rest, it says where the layer's time goes)
    expert       omni_moe.omni_expert alone, on the layer's own routing
    peer_gather  the expert sum as PEER / product-key code writes it: nn.Embedding rows of
                 both tables gathered into (T, k, H) tensors and einsums over them
    peer_bag     the up rows gathered the same way, the down projection as
                 F.embedding_bag(..., mode="sum", per_sample_weights=...)
    reference    the token-centric expert path the checks use (gathers plus batched matmuls;
                 omni_moe.layers.reference.expert_reference)
    dense_mlp    the shared SwiGLU MLP alone (3 GEMMs + fused activation)
    peer_layer   the whole layer run PEER-style: the layer's router and shared MLP, its
                 expert sum through peer_gather (not in the default set; the
                 token-centric twin that ``--preset paper`` sets beside the layer)

Every expert-path variant gets the same inputs: the layer's own routing indices and
weights.  "forward" runs under ``torch.no_grad()``; "fwd+bwd" is a training step of the
variant (forward with autograd, backward of a random output gradient; gradients of the
input and of every weight, reset to None before each call as a training step finds them).

Checks before timing: the expert path against a float32 token-centric oracle (output and
all four gradients, on the rows of the experts used); each peer against the expert path
(output, gradients of h and w and of the used rows of both tables), and peer_layer
against the layer (output, gradients of h and of the used table rows), within twice the
oracle tolerance since both round.  'ok' says whether a variant passed its check.  Where
T*k exceeds CHECK_PAIRS the checks take the first CHECK_PAIRS // k tokens (the oracle
holds (T, k, H) float32 tensors).

A forward median above the forward+backward median of the same variant contradicts
itself (the step contains the forward); the table marks it '!' with a footnote rather
than hiding it behind a re-measure: something else slowed that measurement (on CPU most
often more torch threads than idle cores -- the thread line at the start says).

On CUDA, per variant, also:
  fwd graph / f+b graph
              the forward / training step captured once in a CUDA graph with static
              inputs and replayed ('-' with a footnote where capture fails)
  host ms     CPU time of issuing one eager step: the device idle before (synchronised),
              the clock stopped when the call returns, before the GPU finishes
  launches    kernels, memsets and copies of one step, counted with torch.profiler
              (with --launches; it costs a profiler start per variant)
  peak MiB    peak extra memory of one step (torch.cuda.max_memory_allocated above what
              was allocated before it, statistics reset first; the JSON has the forward's too)
and the expert path's HBM floor -- bytes that must move at the copy bandwidth measured
on this device:
    forward   D*2*H*b (u, v rows of the D distinct experts touched, counted from the
              actual indices) + 2*T*H*b (read h, write out) + T*k*(4 + 4) (indices, weights)
    backward  D*2*H*b (read u, v) + D*2*H*b (write du, dv rows) + 3*T*H*b (h, dout, dh)
              + T*k*(4 + 4 + 4) (indices, weights, dw)
    dense     the same plus 2*(E-D)*H*b: the zero rows of the dense (E, H) gradients that
              autograd's parameter gradients require (8 GiB at E = 2^20, H = 2048)
-- and the ratios: each step's time / the dense MLP's, eager and graph (layer / MLP is
what the experts cost on top of the shared MLP); expert-path variants' time / the expert
path's (what a user gains by switching); expert-path time / floor.

Without CUDA it times small cases on CPU (PyTorch paths) and says so; the table keeps the
columns that mean something there (no graph, host, launch, memory or floor columns).

--preset paper runs the OmniMoE paper's efficiency sweep instead (see
``omni_moe.bench.paper``); with it, --cases may give 'T,k' pairs (H, I, E from the preset).

--json saves the rows and the environment after every case; --from-json reprints (and
--plot redraws) a saved run without running anything.  Exit status 1 if a check fails,
2 on bad arguments (one line on stderr).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time

import torch

from . import common
from .peers import PEERS

DEFAULT_CASES = [
    (4096, 1024, 4096, 4096, 16),
    (8192, 1024, 4096, 65536, 32),
    (4096, 2048, 8192, 1048576, 16),
]
CPU_CASES = [
    (256, 64, 128, 256, 4),
    (512, 64, 128, 1024, 8),
]
DEFAULT_VARIANTS = ("layer", "router", "expert", *PEERS, "reference", "dense_mlp")
VARIANTS = (*DEFAULT_VARIANTS, "peer_layer")
# Variants that compute the expert sum on the layer's routing (share its floor).
EXPERT_PATHS = ("expert", *PEERS, "reference")
CHECK_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# (token, expert) pairs the checks take at most: 1 GiB of (T, k, H) float32 at H = 1024.
CHECK_PAIRS = 2**18


def check_case(case):
    T, H, I, E, K = case
    if min(case) < 1:
        return "need five positive integers"
    if math.isqrt(E) ** 2 != E:
        return f"E={E} is not a perfect square"
    if K > E:
        return f"k={K} > E={E}"
    return None


def _check_pair(case):
    return "need two positive integers" if min(case) < 1 else None


_FULL_CASES = common.cases_type(("T", "H", "I", "E", "k"), check_case)
_PAIR_CASES = common.cases_type(("T", "k"), _check_pair)


def parse_cases(text: str):
    """--cases: 'T,H,I,E,k;...', or 'T,k;...' (every case) for a preset to complete:
    (T, None, None, None, k) until ``check_arguments`` fills in the preset's sizes."""
    parts = [p for p in text.split(";") if p.strip()]
    if parts and all(len(p.split(",")) == 2 for p in parts):
        return [(T, None, None, None, k) for T, k in _PAIR_CASES(text)]
    return _FULL_CASES(text)


def parse_variants(text: str):
    return common.parse_names(text, VARIANTS, "variant(s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``omni-moe bench layer``."""
    from . import paper

    common.add_common_arguments(
        parser, ("T", "H", "I", "E", "k"), check_case,
        "'" + ";".join(",".join(map(str, c)) for c in DEFAULT_CASES) + "' on CUDA, small cases on CPU; "
        "with --preset also 'T,k;...', H, I and E from the preset", parse_cases=parse_cases)
    parser.add_argument("--preset", choices=sorted(paper.PRESETS), default=None,
                        help="run a fixed sweep instead of --cases' defaults: 'paper' = the OmniMoE "
                        "paper's efficiency experiment (H = I = 1024, E = 102,400, K 512-4096, "
                        "1k-16k tokens, beside its PEER-style twin; a CPU-sized form without CUDA), "
                        "with its own table and --plot")
    parser.add_argument("--act", choices=("silu", "gelu", "relu"), default="silu",
                        help="activation of the experts and the MLP (default silu)")
    parser.add_argument("--variants", type=parse_variants, default=None, metavar="A,B",
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all but "
                        "peer_layer; with --preset, the preset's)")
    parser.add_argument("--expert-precision", choices=("exact", "bfloat16"), default="exact",
                        help="the layer's expert_precision and the expert variant's and check's "
                        "precision (default exact; docs/expert.md, 'Precision')")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    parser.add_argument("--no-graphs", action="store_true",
                        help="skip the CUDA-graph replays (CUDA only)")
    parser.add_argument("--launches", action="store_true",
                        help="count the launches of each training step with torch.profiler (CUDA only)")


def check_arguments(args) -> None:
    """Everything wrong that is knowable before any work or output (UsageError): the
    shared checks, --preset with --from-json, 'T,k' cases without a preset, and the
    preset's cases (completed here with its H, I and E for this device)."""
    from . import paper

    common.check_run_arguments(args)
    preset = getattr(args, "preset", None)
    if args.from_json:
        if preset:
            raise common.UsageError("--preset cannot be combined with --from-json "
                                    "(a saved run is reprinted as it was)")
        return
    if not args.cases:
        return
    if any(c[1] is None for c in args.cases) and not preset:
        raise common.UsageError("--cases 'T,k' needs --preset (which sets H, I and E); "
                                "without one give 'T,H,I,E,k'")
    if preset:
        sizes = paper.resolve(preset, torch.cuda.is_available())
        full = [c if c[1] is not None else (c[0], sizes.hidden, sizes.intermediate, sizes.experts, c[4])
                for c in args.cases]
        for c in full:
            why = check_case(c)
            if why:
                raise common.UsageError(f"--cases: bad case {c[0]},{c[4]} with the {preset} preset's "
                                        f"sizes ({sizes.where}: H={c[1]}, I={c[2]}, E={c[3]}): {why}")
        args.cases = full


def _say(msg: str) -> None:
    print(msg, flush=True)


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e)


def _free():
    # Only CUDA measures memory and has a cache to return: on CPU a full collection per
    # measurement costs more than the small cases' timing (0.1-0.4 s each).
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device) -> float | None:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    if device.type != "cuda":
        return None
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = common.median_ms(lambda: dst.copy_(src))
    del src, dst
    _free()
    return 2 * n / (ms * 1e-3)


def expert_floor_bytes(T, H, K, D, b, E):
    """(forward, forward+backward, forward+backward with dense (E, H) weight gradients) of
    the expert path in the layer (float32 routing weights): the op's floor formula."""
    from omni_moe.ops.expert.kernels import expert_floor_bytes as floor

    kw = dict(dtype_bytes=b, distinct=D, weight_bytes=4)
    return (floor(T, H, E, K, **kw), floor(T, H, E, K, backward=True, dense_weight_grads=False, **kw),
            floor(T, H, E, K, backward=True, **kw))


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


def check_expert(h, up, down, w, idx, act, dtype, precision="exact"):
    """Expert path (``omni_expert`` at ``precision``) vs a float32 token-centric oracle on
    the rows of the experts used.

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
    out = omni_expert(hh, uu, dd, ww, idx, act, precision=precision)
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


def check_peers(h, up, down, w, idx, act, dtype, names):
    """Each peer against ``omni_expert`` on the same inputs: {peer: {quantity: rel L2, "pass"}}.

    Gradients of the tables are compared on the rows of the experts used (the others are
    zero in both, and copying them would cost gigabytes at E = 2^20).
    """
    from omni_moe import omni_expert

    uniq = torch.unique(idx.long())
    gout = torch.randn(h.shape, device=h.device, dtype=h.dtype)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (h, up, down, w)]
        hh, uu, dd, ww = leaves
        out = fn(hh, uu, dd, ww, idx, act)
        out.backward(gout)
        rows = [None if g is None else g[uniq] for g in (uu.grad, dd.grad)]
        res = {"out": out.detach(), "d_hidden": hh.grad, "d_up_used_rows": rows[0],
               "d_down_used_rows": rows[1], "d_routing_weights": ww.grad}
        del leaves, hh, uu, dd, ww
        _free()
        return res

    ours = run(omni_expert)
    results = {}
    for name in names:
        try:
            theirs = run(PEERS[name])
        except NotImplementedError as e:  # torch lacks an op for this dtype/device
            results[name] = {"unsupported": _first_line(e), "pass": None}
            _free()
            continue
        except Exception as e:  # noqa: BLE001 -- reported as a failed check
            results[name] = {"error": _first_line(e), "pass": False}
            _free()
            continue
        # a gradient the peer does not produce is a failure, not a crash
        res = {key: math.inf if theirs[key] is None else _rel(theirs[key], ours[key]) for key in ours}
        res["pass"] = max(res.values()) <= 2 * CHECK_TOL[dtype]
        results[name] = res
        del theirs
    del ours
    _free()
    return results


def check_peer_layer(layer, h, dtype):
    """``peer_layer`` against the layer itself on ``h``: output, gradient of h and of the
    used rows of both tables (rel L2); passes within twice the oracle tolerance."""
    from .peers import peer_layer

    with torch.no_grad():
        uniq = torch.unique(layer.route(h)[1].long())
    gout = torch.randn(h.shape, device=h.device, dtype=h.dtype)
    U, V = layer.up_embed.weight, layer.down_embed.weight

    def run(fn):
        layer.zero_grad(set_to_none=True)
        x = h.detach().clone().requires_grad_()
        out = fn(x)
        out.backward(gout)
        res = {"out": out.detach(), "d_hidden": x.grad, "d_up_used_rows": U.grad[uniq],
               "d_down_used_rows": V.grad[uniq]}
        layer.zero_grad(set_to_none=True)
        return res

    ours = run(layer)
    theirs = run(lambda x: peer_layer(layer, x))
    res = {key: _rel(theirs[key], ours[key]) for key in ours}
    res["pass"] = max(res.values()) <= 2 * CHECK_TOL[dtype]
    del ours, theirs
    _free()
    return res


def _measure(fn, device, warmup_ms, rep_ms, grad_to_none):
    """(median ms, peak extra bytes of one call or None)."""
    peak = None
    if device.type == "cuda":
        _reset(grad_to_none)
        fn()
        _sync()
        _reset(grad_to_none)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync()
        peak = torch.cuda.max_memory_allocated() - base
    ms = common.median_ms(fn, warmup_ms, rep_ms, grad_to_none=grad_to_none)
    _reset(grad_to_none)
    return ms, peak


def _reset(leaves):
    for t in leaves or ():
        t.grad = None


def graph_step_ms(step, leaves, warmup_ms, rep_ms) -> float:
    """Median ms of replaying a CUDA graph of one training step captured with static inputs.

    Warmed up on a side stream first (as torch's whole-network capture does), then
    captured with every ``.grad`` None, so the graph allocates the gradients from its pool
    and each replay overwrites them.
    """
    def warm():
        _reset(leaves)
        step()

    try:
        graph = common.capture_graph(step, warmup=warm, before_capture=lambda: _reset(leaves))
        _sync()
        return common.median_ms(graph.replay, warmup_ms, rep_ms)
    finally:
        _reset(leaves)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def active_params(H, I, E, K) -> int:
    """Parameters one token uses: the shared MLP (3*H*I), the two router gates (2*N*H)
    and its K atomic experts (a u and a v row each, 2*K*H)."""
    return 3 * H * I + 2 * math.isqrt(E) * H + 2 * K * H


def run_case(case, dtype, act, variants, device, args, bw, label, env=None):
    """Check and time ``variants`` at ``case``; the row of the JSON file (``env``: the
    run's environment, whose GPU and versions every row repeats)."""
    from omni_moe import OmniMoE, OmniMoEConfig, omni_expert
    from omni_moe.ops import swiglu_mlp
    from omni_moe.layers.reference import expert_reference
    from .peers import peer_layer

    T, H, I, E, K = case
    b = torch.finfo(dtype).bits // 8
    cuda = device.type == "cuda"
    env = env or {}
    row = {"T": T, "hidden": H, "intermediate": I, "experts": E, "k": K, "dtype": str(dtype).replace("torch.", ""),
           "act": act, "variants": list(variants), "active_params": active_params(H, I, E, K),
           "gpu": env.get("gpu"), "torch": env.get("torch"), "triton": env.get("triton"),
           "times_ms": {}, "peak_mem_MiB": {}, "graph_ms": {}, "host_ms": {}, "launches": {}, "errors": {}}
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    precision = getattr(args, "expert_precision", "exact")
    row["expert_precision"] = precision
    cfg = OmniMoEConfig(hidden_size=H, intermediate_size=I, hidden_act=act, num_experts=E,
                        num_experts_per_token=K, expert_precision=precision)
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
        n = min(T, max(2, CHECK_PAIRS // K))
        row["checked_tokens"] = n
        if n < T:
            _say(f"{label} checks on the first {n} tokens (T*k above {CHECK_PAIRS:,} pairs)")
        res = check_expert(h[:n], layer.up_embed.weight, layer.down_embed.weight, w[:n], idx[:n], act, dtype,
                           precision)
        row["check"] = res
        _say(f"{label} check expert path vs float32 oracle: "
             + ", ".join(f"{k} {v:.2e}" for k, v in res.items() if k.startswith(("out", "d_")))
             + f"; unused rows' grad max {res['unused_rows_grad_abs_max']}: "
             + ("PASS" if res["pass"] else "FAIL"))
        _free()
        peers = [v for v in variants if v in PEERS]
        if peers:
            row["peer_check"] = check_peers(h[:n], layer.up_embed.weight, layer.down_embed.weight, w[:n],
                                            idx[:n], act, dtype, peers)
        if "peer_layer" in variants:
            row.setdefault("peer_check", {})["peer_layer"] = check_peer_layer(layer, h[:n], dtype)
        if row.get("peer_check"):
            for name, res in row["peer_check"].items():
                _say(f"{label} check {name} vs {'the layer' if name == 'peer_layer' else 'expert path'}: "
                     + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in res.items() if k != "pass")
                     + ": " + {True: "PASS", False: "FAIL", None: "not run"}[res["pass"]])

    params = list(layer.parameters())
    U, V = layer.up_embed.weight, layer.down_embed.weight
    Wg, Wu, Wd = layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight
    h_req = h.detach().clone().requires_grad_()
    w_req = w.detach().clone().requires_grad_()

    def fb(fn, leaves):
        def step():
            fn().backward(gout)
        return step, leaves

    def expert_like(fn):
        return (lambda: fn(h, U, V, w, idx, act),
                *fb(lambda: fn(h_req, U, V, w_req, idx, act), [h_req, U, V, w_req]))

    gs = torch.randn(T, K, device=device, dtype=torch.float32)
    router_leaves = [h_req, layer.router_gate_x.weight, layer.router_gate_y.weight]

    def router_step():
        layer.route(h_req)[0].backward(gs)

    plans = {
        "layer": (lambda: layer(h), *fb(lambda: layer(h_req), [h_req] + params)),
        "peer_layer": (lambda: peer_layer(layer, h), *fb(lambda: peer_layer(layer, h_req), [h_req] + params)),
        "router": (lambda: layer.route(h), router_step, router_leaves),
        "expert": expert_like(lambda *a: omni_expert(*a, precision=precision)),
        **{name: expert_like(fn) for name, fn in PEERS.items()},
        "reference": expert_like(expert_reference),
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
                extra = "" if peak is None else f", peak +{peak / 2**20:,.0f} MiB"
                if cuda and mode == "fwd+bwd":
                    row["host_ms"][key] = common.host_ms(step, grad_to_none=leaves)
                    extra += f", host {row['host_ms'][key]:.3f} ms"
                    if args.launches:
                        row["launches"][key] = common.cuda_launches(lambda: (_reset(leaves), step()))
                        extra += f", {row['launches'][key]} launches"
                if cuda and not args.no_graphs:
                    try:
                        row["graph_ms"][key] = graph_step_ms(fn, grads, args.warmup_ms, args.rep_ms)
                        extra += f", graph {row['graph_ms'][key]:.3f} ms"
                    except Exception as e:  # noqa: BLE001 -- a capture failure is a result
                        row["graph_ms"][key] = None
                        row["errors"][f"{key} graph"] = "out of memory" if _is_oom(e) else _first_line(e)
                        extra += f", graph capture failed ({_first_line(e)})"
                        try:
                            _sync()
                        except Exception:  # noqa: BLE001 -- the error was recorded above
                            pass
                _say(f"{label} {key:22s} {ms:9.3f} ms{extra}")
            except Exception as e:  # noqa: BLE001 -- a variant that fails is a result, not a crash
                row["times_ms"][key] = None
                # out of memory is a measurement; any other error fails the run (exit 1)
                row["errors"][key] = "out of memory" if _is_oom(e) else _first_line(e)
                # out of memory and an operation torch lacks (e.g. embedding_bag's bf16
                # per-sample-weight backward on CUDA) are results; any other error fails
                if not (_is_oom(e) or isinstance(e, NotImplementedError)):
                    row["failed"] = True
                _say(f"{label} {key:22s} {row['errors'][key]}")
            finally:
                _reset(leaves)
                _free()

    fwd_bytes, fb_bytes, dense_bytes = expert_floor_bytes(T, H, K, D, b, E)
    row["expert_floor_bytes"] = {"fwd": fwd_bytes, "fwd+bwd": fb_bytes, "fwd+bwd dense grads": dense_bytes}
    tm = row["times_ms"]
    ratios = {}
    for mode in ("fwd", "fwd+bwd"):
        e, r = tm.get(f"expert {mode}"), tm.get(f"reference {mode}")
        if e and r:
            ratios[f"expert speedup vs reference {mode}"] = r / e
        for peer in PEERS:
            p = tm.get(f"{peer} {mode}")
            if e and p:
                ratios[f"expert speedup vs {peer} {mode}"] = p / e
        if bw and e:
            floor_ms = (fwd_bytes if mode == "fwd" else fb_bytes) / bw * 1e3
            row.setdefault("expert_floor_ms", {})[mode] = floor_ms
            ratios[f"expert x-floor {mode}"] = e / floor_ms
            if mode == "fwd+bwd":
                dense_ms = dense_bytes / bw * 1e3
                row["expert_floor_ms"]["fwd+bwd dense grads"] = dense_ms
                ratios["expert x-floor fwd+bwd dense grads"] = e / dense_ms
    for d, tag in (("times_ms", ""), ("graph_ms", " graph")):
        for mode in ("fwd", "fwd+bwd"):
            lt, pt = row[d].get(f"layer {mode}"), row[d].get(f"peer_layer {mode}")
            if lt and pt:
                ratios[f"peer_layer / layer {mode}{tag}"] = pt / lt
    lf, mf = tm.get("layer fwd+bwd"), tm.get("dense_mlp fwd+bwd")
    if lf and mf:
        ratios["layer / dense_mlp fwd+bwd"] = lf / mf
    lg, mg = row["graph_ms"].get("layer fwd+bwd"), row["graph_ms"].get("dense_mlp fwd+bwd")
    if lg and mg:
        ratios["layer / dense_mlp fwd+bwd graph"] = lg / mg
    row["ratios"] = ratios
    del layer, params, U, V, Wg, Wu, Wd, plans, h, gout, h_req, w_req, scores, idx, w, gs, router_leaves
    _free()
    row["date"] = common.utc_now()
    row["row_s"] = time.perf_counter() - t0
    _say(f"{label} row done in {row['row_s']:.1f} s")
    return row


# (header, what, format, CUDA only).  ``what`` picks a value from (row, variant).
def _t(d, mode):
    return lambda r, v: r.get(d, {}).get(f"{v} {mode}")


def _ok(r, v):
    if v == "expert" and "check" in r:
        return r["check"]["pass"]
    return (r.get("peer_check") or {}).get(v, {}).get("pass")


def _over(d, mode, base):
    def get(r, v):
        t, t0 = r.get(d, {}).get(f"{v} {mode}"), r.get(d, {}).get(f"{base} {mode}")
        return t / t0 if t and t0 else None
    return get


def _minus(d, mode, base):
    def get(r, v):
        t, t0 = r.get(d, {}).get(f"{v} {mode}"), r.get(d, {}).get(f"{base} {mode}")
        return t - t0 if t is not None and t0 is not None else None
    return get


def _x_floor(key):
    def get(r, v):
        t, fl = r.get("times_ms", {}).get(f"{v} fwd+bwd"), (r.get("expert_floor_ms") or {}).get(key)
        return t / fl if v in EXPERT_PATHS and t and fl else None
    return get


def fwd_over_step(r, v, d="times_ms") -> bool:
    """True when variant ``v``'s forward median in ``r[d]`` exceeds its forward+backward
    median: a contradiction (the step contains the forward), marked '!' in the tables."""
    f, fb = (r.get(d) or {}).get(f"{v} fwd"), (r.get(d) or {}).get(f"{v} fwd+bwd")
    return f is not None and fb is not None and f > fb


FWD_FLAG = "!"
FWD_FLAG_NOTE = (f"{FWD_FLAG} forward median above the forward+backward median of the same variant: "
                 "the two contradict each other (the step contains the forward), so something else "
                 "slowed one of them -- on CPU most often more torch threads than idle cores (see the "
                 "thread line); rerun before reading either number")


def _fwd(d):
    return lambda r, v: ((r.get(d) or {}).get(f"{v} fwd"), fwd_over_step(r, v, d))


COLUMNS = [
    ("T", lambda r, v: r["T"], "d", False), ("H", lambda r, v: r["hidden"], "d", False),
    ("I", lambda r, v: r["intermediate"], "d", False), ("E", lambda r, v: r["experts"], "d", False),
    ("k", lambda r, v: r["k"], "d", False), ("D", lambda r, v: r.get("distinct_experts"), "d", False),
    ("variant", lambda r, v: v, "s", False), ("ok", _ok, "ok", False),
    ("fwd ms", _fwd("times_ms"), "fwd", False), ("f+b ms", _t("times_ms", "fwd+bwd"), ".3f", False),
    ("fwd graph ms", _fwd("graph_ms"), "fwd", True), ("f+b graph ms", _t("graph_ms", "fwd+bwd"), ".3f", True),
    ("host ms", _t("host_ms", "fwd+bwd"), ".3f", True), ("launches", _t("launches", "fwd+bwd"), "d", True),
    ("peak MiB", _t("peak_mem_MiB", "fwd+bwd"), ",.0f", True),
    ("peak - mlp MiB", _minus("peak_mem_MiB", "fwd+bwd", "dense_mlp"), ",.0f", True),
    ("f+b / mlp", _over("times_ms", "fwd+bwd", "dense_mlp"), ".2f", False),
    ("graph / mlp", _over("graph_ms", "fwd+bwd", "dense_mlp"), ".2f", True),
    ("f+b / expert", lambda r, v: _over("times_ms", "fwd+bwd", "expert")(r, v) if v in EXPERT_PATHS else None,
     ".2f", False),
    ("x floor", _x_floor("fwd+bwd"), ".1f", True),
    ("x dense-grad floor", _x_floor("fwd+bwd dense grads"), ".1f", True),
]


def _cell(v, fmt):
    if fmt == "fwd":  # (ms, flagged): a forward slower than its step carries the flag
        ms, flagged = v
        return "-" if ms is None else format(ms, ".3f") + (FWD_FLAG if flagged else "")
    if fmt == "ok":
        return "-" if v is None else ("yes" if v else "NO")
    if v is None:
        return "-"
    return str(v) if fmt == "s" else format(v, fmt)


def _variants_of(row):
    # Files written before the "variants" key existed name them only in "times_ms".
    return row.get("variants") or list(dict.fromkeys(k.rsplit(" ", 1)[0] for k in row["times_ms"]))


def format_table(rows, gpu: bool) -> str:
    """Markdown table, one line per (case, variant); GPU-only columns only if ``gpu``."""
    cols = [c for c in COLUMNS if gpu or not c[3]]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |",
             "|" + "|".join("---" if c[2] in ("s", "ok") else "---:" for c in cols) + "|"]
    notes = []
    flagged = False
    for r in rows:
        if "times_ms" not in r:
            continue
        for v in _variants_of(r):
            lines.append("| " + " | ".join(_cell(get(r, v), fmt) for _, get, fmt, _ in cols) + " |")
            flagged = flagged or fwd_over_step(r, v) or (gpu and fwd_over_step(r, v, "graph_ms"))
        for key, why in (r.get("errors") or {}).items():
            notes.append(f"T={r['T']} H={r['hidden']} E={r['experts']} k={r['k']} {key}: {why}")
    return "\n".join(lines + [f"  {n}" for n in notes + ([FWD_FLAG_NOTE] if flagged else [])])


def _report(result, plot_path=None) -> None:
    """Print the table of a result (fresh or loaded from --json); draw it if asked."""
    from . import paper

    env = result.get("environment") or {}
    gpu = result["mode"] == "cuda" if "mode" in result else bool(env.get("gpu"))
    bw = result.get("copy_bandwidth_Bps")
    rows = result["rows"]
    preset = result.get("preset")
    where = env.get("gpu") or f"CPU ({result.get('mode', 'cpu')})"
    lines = [f"omni-moe layer{f' --preset {preset}' if preset else ''}, {where}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, {env.get('date')}; times in ms, medians",
             paper.format_table(rows, gpu) if preset else format_table(rows, gpu)]
    if preset:
        lines.append(paper.legend(gpu, [r for r in rows if "times_ms" in r] or rows))
    elif gpu:
        lines.append("fwd / f+b graph: the forward / one training step replayed from a CUDA graph; host: CPU time of "
                     "issuing one eager step; peak: extra memory of one step (- mlp: minus the dense MLP's); x floor: f+b / the "
                     "expert path's HBM bytes at the measured copy bandwidth"
                     + (f" {bw / 1e12:.2f} TB/s" if bw else "")
                     + "; x dense-grad floor: the same with the zero rows of dense (E, H) gradients")
    if not gpu:
        lines.append("CPU wall times (no CUDA device)" + (
            "; Triton kernels through the interpreter: their times mean nothing"
            if result.get("mode") == "cpu-interpret" else ", PyTorch paths"))
    threads = env.get("cpu_threads")
    if threads:
        lines.append("CPU threads: " + common.describe_threads(threads)
                     + (" -- OVERSUBSCRIBED: CPU-side times are slow and noisy" if threads["oversubscribed"] else ""))
    for r in rows:
        if "errors" in r and "times_ms" not in r:
            lines.append(f"T={r['T']} H={r['hidden']} E={r['experts']} k={r['k']}: skipped "
                         f"({', '.join(f'{k}: {v}' for k, v in r['errors'].items())})")
    if preset:
        lines += paper.published_lines(rows)
    # Built whole before printing: a malformed saved file fails before any output.
    print("\n".join(lines), flush=True)
    if plot_path:
        title = f"omni-moe layer{f' --preset {preset}' if preset else ''}, {where}, {str(env.get('date'))[:10]}"
        (paper.plot if preset else plot)(rows, plot_path, title, gpu)
        print(f"wrote {plot_path}")


def plot(rows, path, title, gpu: bool) -> None:
    """Bars of the training-step time of every variant per case (eager; graph on CUDA),
    log scale, with the expert path's floor on CUDA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "times_ms" in r]
    names = list(dict.fromkeys(v for r in rows for v in _variants_of(r)))
    has_graphs = any(v for r in rows for v in (r.get("graph_ms") or {}).values())
    panels = [("times_ms", "eager")] + ([("graph_ms", "CUDA graph")] if gpu and has_graphs else [])
    width = 0.8 / max(1, len(names))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 2.0 * len(rows)), 4 * len(panels)),
                             sharex=True, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels):
        for j, v in enumerate(names):
            vals = [r.get(key, {}).get(f"{v} fwd+bwd") or math.nan for r in rows]
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, vals, width, label=v)
        for i, r in enumerate(rows if gpu else ()):
            floor = (r.get("expert_floor_ms") or {}).get("fwd+bwd")
            if floor:
                ax.hlines(floor, i - 0.45, i + 0.45, colors="k", linestyles="dashed",
                          label="expert HBM floor" if i == 0 else None)
        ax.set_yscale("log")
        ax.set_ylabel(f"fwd+bwd ms, {label}")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1, 0].set_xticks(range(len(rows)))
    axes[-1, 0].set_xticklabels([f"T={r['T']} H={r['hidden']}\nE={r['experts']} k={r['k']}" for r in rows],
                                fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _looks_like_layer_run(data) -> bool:
    # Files written before the "benchmark" key existed have "copy_bandwidth_Bps".
    return ((data.get("benchmark") == "layer" or "copy_bandwidth_Bps" in data)
            and all({"T", "hidden", "intermediate", "experts", "k"} <= r.keys() for r in data["rows"]))


def run(args) -> int:
    """Run the benchmark; returns a process exit code (1 if a correctness check failed)."""
    from omni_moe.ops._dispatch import interpret_mode

    from . import paper

    check_arguments(args)
    if common.report_saved(args, "layer", _looks_like_layer_run, _report):
        return 0

    dtype = common.TORCH_DTYPES[args.dtype]
    cuda = torch.cuda.is_available()
    mode = "cuda" if cuda else ("cpu-interpret" if interpret_mode() else "cpu")
    preset = paper.resolve(args.preset, cuda) if args.preset else None
    if preset:
        plan = ([(c, tuple(args.variants or paper.BOTH)) for c in args.cases] if args.cases
                else [(c, tuple(args.variants or v)) for c, v in preset.cases()])
    else:
        plan = [(c, tuple(args.variants or DEFAULT_VARIANTS))
                for c in args.cases or (DEFAULT_CASES if cuda else CPU_CASES)]
    if cuda:
        device = torch.device("cuda")
        _say(f"device: {torch.cuda.get_device_name()}; dtype {args.dtype}; {len(plan)} case(s)")
        common.warm_up_triton()
    else:
        device = torch.device("cpu")
        _say("CUDA is not available: timing small cases on CPU "
             + ("through the Triton interpreter (meaningless as kernel timings)" if mode == "cpu-interpret"
                else "(PyTorch paths, not the Triton kernels)")
             + f"; dtype {args.dtype}")
    if preset:
        _say(f"--preset {args.preset} ({preset.where}): H={preset.hidden}, I={preset.intermediate}, "
             f"E={preset.experts:,}; {len(plan)} row(s), (T, K): "
             + " ".join(f"({c[0]}, {c[4]})" for c, _ in plan))
    bw = copy_bandwidth(device)
    if bw:
        _say(f"measured device-to-device copy bandwidth: {bw / 1e12:.2f} TB/s")
    rows = []
    env = common.environment()
    result = {"benchmark": "layer", "mode": mode, "environment": env,
              "settings": {"dtype": args.dtype, "act": args.act,
                           "expert_precision": args.expert_precision, "warmup_ms": args.warmup_ms,
                           "rep_ms": args.rep_ms, "min_samples": common.MIN_SAMPLES, "seed": args.seed,
                           "graphs": cuda and not args.no_graphs, "launches": cuda and args.launches},
              "copy_bandwidth_Bps": bw, "rows": rows}
    if preset:
        result["preset"] = args.preset
        result["preset_sizes"] = {"where": preset.where, "hidden": preset.hidden,
                                  "intermediate": preset.intermediate, "experts": preset.experts}
        result["published"] = paper.PUBLISHED

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    ok = True
    for i, (case, variants) in enumerate(plan):
        label = f"[{i + 1}/{len(plan)} T={case[0]} H={case[1]} I={case[2]} E={case[3]} k={case[4]}]"
        t0 = time.perf_counter()
        try:
            row = run_case(case, dtype, args.act, variants, device, args, bw, label, env)
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            row = None
        if row is None:  # outside the except block: its traceback no longer holds the case's tensors
            _free()
            _say(f"{label} out of memory while setting up the case; skipped")
            rows.append({"T": case[0], "hidden": case[1], "intermediate": case[2], "experts": case[3],
                         "k": case[4], "variants": list(variants), "errors": {"setup": "out of memory"},
                         "gpu": env.get("gpu"), "torch": env.get("torch"), "triton": env.get("triton"),
                         "date": common.utc_now(), "row_s": time.perf_counter() - t0})
            save()
            continue
        ok = ok and row.get("check", {}).get("pass", True)
        ok = ok and all(res["pass"] is not False for res in (row.get("peer_check") or {}).values())
        ok = ok and not row.get("failed")
        rows.append(row)
        save()
    _say("")
    _report(result, args.plot)
    if args.json:
        _say(f"wrote {args.json}")
    if not ok:
        print("FAILED: a correctness check or a variant failed (see the lines above)", file=sys.stderr)
    return 0 if ok else 1
