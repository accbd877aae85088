"""The atomic-expert op's schedules at the paper's sizes: check, then time, on a GPU.

    PYTHONPATH=. python benchmarks/expert_schedules.py --json OUT.json [--ks 512,4096]

Inputs: T tokens, H = 1024, E = 102,400 (N = 320), bf16 tables, the router's own unsorted
top-k of random log-softmax logits and its scores (``log_weights``, as the layer calls
the op).  For each (T, k):
- grouping alone: ``group_pairs`` (by expert) and ``group_rows`` + ``row_groups`` (by grid
  row);
- the forward's per-pair dot products alone: ``_pair_dot_kernel`` ("expert") and
  ``_row_dot_kernel`` ("rows") under each ``RowTile`` of ``--variants`` (each checked
  against the pair-dot kernel's a: relative max error);
- the whole op per schedule of ``--schedules`` ("dense": the forward as chunked dense GEMMs,
  also under each chunk of ``--dense-chunks``): forward and forward + backward (all four
  gradients), eager (``do_bench`` median, L2 flushed) and CUDA-graph replay, peak memory
  of the forward and of the training step above what was allocated, and each schedule's
  results against the expert schedule's (relative L2 error of out and each gradient);
  ``--dense-variants`` adds the dense schedule with its weight gradients as GEMMs
  (``gemm-grads``: ``ExpertConfig.dense_weight_grads``) and with ``precision="bfloat16"``
  (``bf16``, ``bf16-gemm-grads``).
The tables (2 x 210 MB) exceed L2, so no input rotation is needed.

``--decode``: the token forward's slot chunks at decode sizes instead (``--decode-cases``
T:k:E triples, H = 1024): ``expert_forward`` with the token schedule and ``Tile.split`` =
1, the launch rule's split, half and twice it and k / 32, k / 16 chunks; CUDA-graph replay
(``do_bench`` median, L2 flushed), each split's output against one chunk's (relative L2)
and against its own second call (same bits).

``--dry-run`` runs tiny sizes on the CPU through Triton's interpreter (checks the script,
times nothing meaningful).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omni_moe.bench.common import capture_graph, environment  # noqa: E402
from omni_moe.ops.expert import kernels as kern  # noqa: E402
from omni_moe.ops.expert import rows as rows_mod  # noqa: E402
from omni_moe.ops.router import omni_router  # noqa: E402

# --dense-variants: name -> (ExpertConfig.dense_weight_grads, precision)
DENSE_VARIANTS = {"gemm-grads": (True, "exact"), "bf16": (False, "bfloat16"),
                  "bf16-gemm-grads": (True, "bfloat16")}

VARIANTS = {
    "t64j64h64": rows_mod.RowTile(64, 64, 64, 256, 4, 3, 2),
    "t128j64h64w8": rows_mod.RowTile(128, 64, 64, 256, 8, 3, 2),
    "t64j128h64w8": rows_mod.RowTile(64, 128, 64, 256, 8, 3, 2),
    "t128j128h64w8p1": rows_mod.RowTile(128, 128, 64, 256, 8, 3, 1),
    "t64j64h128s2": rows_mod.RowTile(64, 64, 128, 256, 4, 2, 2),
    "t64j64h64p4": rows_mod.RowTile(64, 64, 64, 256, 4, 3, 4),
    "t128j64h32s4": rows_mod.RowTile(128, 64, 32, 512, 4, 4, 2),
}


def timer(dev):
    if dev == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")

    def once(fn):  # the dry run checks the script: one call, no statistics
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return once


def graph_ms(fn, dev, time_ms):
    if dev != "cuda":
        return None
    graph = capture_graph(fn)
    ms = time_ms(graph.replay)
    del graph
    return ms


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_case(T, k, H, N, variants, dev, out, schedules=("expert", "rows"), dense_chunks=(),
             dense_variants=()):
    time_ms = timer(dev)
    E = N * N
    g = torch.Generator(device=dev).manual_seed(T * 7919 + k)
    up = (torch.randn(E, H, device=dev, generator=g) / 32).bfloat16()
    down = (torch.randn(E, H, device=dev, generator=g) / 32).bfloat16()
    h = torch.randn(T, H, device=dev, generator=g).bfloat16()
    go = torch.randn(T, H, device=dev, generator=g).bfloat16()
    x = torch.randn(T, N, device=dev, generator=g).log_softmax(-1)
    y = torch.randn(T, N, device=dev, generator=g).log_softmax(-1)
    s, idx = omni_router(x, y, N, k, sorted=False)
    base = kern.default_config(T, H, E, k, 2, dtype=torch.bfloat16)
    row = dict(T=T, k=k, H=H, E=E, rule=base.schedule)
    if not variants:
        return _time_schedules(T, k, h, up, down, go, s, idx, base, row, dev, out, schedules,
                               dense_chunks, dense_variants)

    row["group_pairs_ms"] = time_ms(lambda: kern.group_pairs(idx, E))
    row["group_rows_ms"] = time_ms(lambda: rows_mod.row_groups(*rows_mod.group_rows(idx, E), k))
    se, perm = kern.group_pairs(idx, E)
    a_ref = torch.empty(T, k, device=dev)
    c_ref = torch.empty(T, k, device=dev)
    row["pair_dot_ms"] = time_ms(lambda: kern.launch_pair_dot(
        up, h, se, perm, s, a_ref, "silu", base.pair_dot, c=c_ref, log_weights=True))
    sr, pr = rows_mod.group_rows(idx, E)
    groups = rows_mod.row_groups(sr, pr, k)
    row["groups"] = int(groups[2].item())
    row["row_dot"] = {}
    for name, tile in variants.items():
        a = torch.full((T, k), float("nan"), device=dev)
        c = torch.full((T, k), float("nan"), device=dev)

        def call():
            rows_mod.launch_row_dot(up, h, idx, sr, pr, groups, s, a, "silu", tile, c=c,
                                    log_weights=True)
        call()
        err = ((a - a_ref).abs().max() / a_ref.abs().max()).item()
        row["row_dot"][name] = dict(ms=time_ms(call), rel_err=err, tile=asdict(tile))
    del se, perm, sr, pr, groups, a_ref, c_ref
    _time_schedules(T, k, h, up, down, go, s, idx, base, row, dev, out, schedules, dense_chunks,
                    dense_variants)


def _peak_GiB(fn, dev):
    if dev != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def _time_schedules(T, k, h, up, down, go, s, idx, base, row, dev, out, schedules, dense_chunks,
                    dense_variants=()):
    time_ms = timer(dev)
    runs = [(sch, replace(base, schedule=sch), "exact") for sch in dict.fromkeys(("expert", *schedules))]
    runs += [(f"dense_chunk{c}", replace(base, schedule="dense", dense_chunk=c), "exact")
             for c in dense_chunks]
    runs += [(f"dense_{v}", replace(base, schedule="dense", dense_weight_grads=DENSE_VARIANTS[v][0]),
              DENSE_VARIANTS[v][1]) for v in dense_variants]
    results = {}
    for schedule, cfg, precision in runs:

        def fwd():
            return kern.expert_forward(h, up, down, s, idx, "silu", log_weights=True, config=cfg,
                                       precision=precision)

        def step():
            o, a, se_, pm = fwd()
            return o, kern.expert_backward(go, h, up, down, s, idx, a, se_, pm, "silu",
                                           log_weights=True, config=cfg, precision=precision)
        results[schedule] = step()
        row[schedule] = dict(fwd_ms=time_ms(fwd), step_ms=time_ms(step),
                             fwd_graph_ms=graph_ms(fwd, dev, time_ms),
                             step_graph_ms=graph_ms(step, dev, time_ms),
                             fwd_peak_GiB=_peak_GiB(fwd, dev), peak_GiB=_peak_GiB(step, dev))
    o1, g1 = results.pop("expert")
    for schedule, (o2, g2) in results.items():
        row[f"{schedule}_vs_expert_rel_l2"] = dict(
            out=rel(o2, o1), dh=rel(g2[0], g1[0]), du=rel(g2[1], g1[1]), dv=rel(g2[2], g1[2]),
            dscores=rel(g2[3], g1[3]))
    out.append(row)
    print(json.dumps(row), flush=True)


def run_decode_case(T, k, E, H, dev, sms, out):
    time_ms = timer(dev)
    g = torch.Generator(device=dev).manual_seed(T * 7919 + k)
    up = (torch.randn(E, H, device=dev, generator=g) / 32).bfloat16()
    down = torch.randn(E, H, device=dev, generator=g).bfloat16()
    h = torch.randn(T, H, device=dev, generator=g).bfloat16()
    idx = torch.rand(T, E, device=dev, generator=g).argsort(dim=1)[:, :k].to(torch.int32).contiguous()
    s = torch.rand(T, k, device=dev, generator=g) * -8.0 - 4.0
    rule = kern.default_config(T, H, E, k, 2, sms)
    r = rule.token.split
    row = dict(T=T, k=k, E=E, H=H, rule_schedule=rule.schedule, rule_split=r, splits={})
    ref = None
    for sp in sorted({1, r, max(1, r // 2), 2 * r, max(1, k // 32), max(1, k // 16)}):
        cfg = replace(rule, schedule="token", token=replace(rule.token, split=sp))

        def fwd():
            return kern.expert_forward(h, up, down, s, idx, "silu", log_weights=True, config=cfg)[0]
        o = fwd()
        ref = o if ref is None else ref
        row["splits"][sp] = dict(graph_ms=graph_ms(fwd, dev, time_ms), eager_ms=time_ms(fwd),
                                 rel_l2_vs_one_chunk=rel(o, ref), same_bits=bool(torch.equal(fwd(), o)))
    out.append(row)
    cells = ", ".join(f"{sp}{'*' if sp == r else ''}: {v['graph_ms'] if v['graph_ms'] is not None else v['eager_ms']:.4f}"
                      for sp, v in row["splits"].items())
    print(f"T={T} k={k} E={E} ({rule.schedule}) ms by split ({'graph' if dev == 'cuda' else 'eager'}): {cells}",
          flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write rows and environment here (after every case)")
    p.add_argument("--cases", default="4096:512,4096:4096,4096:1024,4096:256,4096:2048,4096:128,16384:512",
                   help="T:k pairs, comma-separated, in order")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="RowTile variants for the rows kernel alone; the first is also timed "
                        "at every k, the rest only at k = 512 and 4096")
    p.add_argument("--schedules", default="expert,rows,dense",
                   help="schedules of the whole op to time (the expert schedule always runs: "
                        "the others are compared with it)")
    p.add_argument("--dense-chunks", default="",
                   help="also time the dense schedule with these experts per chunk (comma-separated)")
    p.add_argument("--dense-variants", default="",
                   help=f"also time the dense schedule as these variants (comma-separated of "
                        f"{','.join(DENSE_VARIANTS)})")
    p.add_argument("--budget-s", type=float, default=300, help="start no case after this many seconds")
    p.add_argument("--decode", action="store_true", help="time the token forward's slot chunks instead")
    p.add_argument("--decode-cases", default="1:512:102400,8:512:102400,64:512:102400,1:3072:65536,"
                   "8:3072:65536,64:3072:65536,256:3072:65536", help="T:k:E triples for --decode")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    if args.decode:
        try:
            dcases = [tuple(int(v) for v in c.split(":")) for c in args.decode_cases.split(",")]
            if any(len(c) != 3 or min(c) < 1 or c[1] > c[2] for c in dcases):
                raise ValueError
        except ValueError:
            p.error(f"--decode-cases must be T:k:E triples of positive integers, k <= E, got {args.decode_cases!r}")
    try:
        cases = [tuple(int(v) for v in c.split(":")) for c in args.cases.split(",")]
        if any(len(c) != 2 or min(c) < 1 for c in cases):
            raise ValueError
    except ValueError:
        p.error(f"--cases must be T:k pairs of positive integers, got {args.cases!r}")
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)} (or '' for none)")
    schedules = args.schedules.split(",")
    bad = [n for n in schedules if n not in kern.SCHEDULES or n == "token"]
    if bad:
        p.error(f"--schedules: unknown {bad}; choose from {[n for n in kern.SCHEDULES if n != 'token']}")
    try:
        chunks = [int(c) for c in args.dense_chunks.split(",") if c]
        if any(c < 1 for c in chunks):
            raise ValueError
    except ValueError:
        p.error(f"--dense-chunks must be positive integers, got {args.dense_chunks!r}")
    dense_variants = [v for v in args.dense_variants.split(",") if v]
    bad = [v for v in dense_variants if v not in DENSE_VARIANTS]
    if bad:
        p.error(f"--dense-variants: unknown {bad}; choose from {list(DENSE_VARIANTS)}")
    out = []
    if args.decode:
        if args.dry_run:
            dev, H, sms, dcases = "cpu", 16, 2, [(1, 160, 400), (3, 40, 64)]
        elif not torch.cuda.is_available():
            p.error("needs a CUDA device (or --dry-run)")
        else:
            dev, H = "cuda", 1024
            sms = torch.cuda.get_device_properties(0).multi_processor_count
        jobs = [(f"T={T} k={k} E={E}", lambda T=T, k=k, E=E: run_decode_case(T, k, E, H, dev, sms, out))
                for T, k, E in dcases]
    else:
        if args.dry_run:
            dev, H, N = "cpu", 16, 8
            cases = [(8, 20)]
            tiles = {n: replace(VARIANTS[n], block_t=16, block_j=16, block_h=16, block_p=32) for n in names[:2]}
        else:
            if not torch.cuda.is_available():
                p.error("needs a CUDA device (or --dry-run)")
            dev, H, N = "cuda", 1024, 320
            tiles = {n: VARIANTS[n] for n in names}
        jobs = [(f"T={T} k={k}", lambda T=T, k=k: run_case(
            T, k, H, N, tiles if (k in (512, 4096) or args.dry_run) else dict(list(tiles.items())[:1]), dev, out,
            schedules, [min(c, 16) for c in chunks] if args.dry_run else chunks, dense_variants))
            for T, k in cases]
    t0 = time.time()
    for name, job in jobs:
        if time.time() - t0 > args.budget_s:
            print(f"budget spent: skipped {name}", flush=True)
            continue
        job()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(environment=environment(), rows=out), f, indent=1)
        if dev == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
