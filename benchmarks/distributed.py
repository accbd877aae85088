#!/usr/bin/env python
"""OmniMoE training on 1 vs 2 processes: tokens/s, peak memory per GPU, scaling
efficiency and loss curves, with DDP, FSDP2 (bf16 mixed precision) and row-sharded
expert tables (``omni_moe.distributed``).

    torchrun --nproc-per-node 2 benchmarks/distributed.py --global-tokens 65536,262144 --json dist.json
    torchrun --nproc-per-node 2 benchmarks/distributed.py --trace traces --json dist.json  # + profiles
    torchrun --nproc-per-node 2 benchmarks/distributed.py --big --phases '' --global-tokens 65536 --json dist_1m.json
    torchrun --nproc-per-node 2 benchmarks/distributed.py --tiny --device cpu   # gloo smoke run

Model: token embedding -> L residual blocks x + OmniMoE(LayerNorm(x)) -> LayerNorm ->
tied head, cross-entropy on synthetic bigram data (next = 31 * prev + 7 + u mod V, u
uniform in 0..3: loss floor log 4).  Every phase trains the same initial model on the
same global batches (``--global-tokens`` per step, split evenly over the ranks; a
comma-separated list runs every phase at every size):

  1gpu        rank 0 alone, float32 parameters (TF32 GEMMs), AdamW
  1gpu_fsdp   rank 0 alone under fully_shard (bf16 parameters, float32 reduction): the
              single-GPU twin of ``fsdp``'s numerics
  ddp         2 ranks, DistributedDataParallel, router statistics synchronised
  fsdp        2 ranks, fully_shard on each block and the model, bf16 MixedPrecisionPolicy
              (fully_shard_model: every block but the last reshards after its forward)
  ddp_sharded 2 ranks, expert tables row-sharded (DTensor Shard(0)), DDP on the rest
  fsdp_keep   (not by default) fsdp, every block keeping its gathered parameters from the
              forward for its backward (reshard_after_forward=False: one all-gather
              fewer per block and step, more memory)
  ddp_bf16    (not by default) ddp with gradients all-reduced in bf16 (DDP's
              bf16_compress_hook: half the traffic; the averaged gradient is rounded)
  (--big)     the --big-phases (default: ddp_sharded, fsdp, ddp, 1gpu, 1gpu_fsdp) again at
              --big-experts experts and --big-layers blocks, 2-GPU phases first (out of
              memory is recorded as such)

While rank 0 runs a 1-GPU phase, rank 1 waits on a CPU (gloo) barrier.  Per phase:
step time (median over the steps after --warmup), tokens/s of the global batch, peak
allocated memory per rank, the global loss per step, and where the step's time goes:
forward, backward (with DDP's gradient all-reduce or FSDP's reduce-scatter, which end
inside it) and optimizer step (AdamW, fused unless --optimizer foreach, and zero_grad),
each the median over the same steps of the time between CUDA events recorded at those
points of rank 0's stream (on CPU, the host clock).  Work that scales with the expert
tables (dense table gradients, their all-reduce, AdamW over the tables) does not shrink
with more ranks, token work does: the breakdown and a token-count sweep tell them apart.
``--trace DIR`` profiles one more step per phase and says how much of it was compute,
NCCL, NCCL with nothing else running (exposed communication) and idle.  Scaling
efficiency = tokens/s on 2 GPUs / (2 x tokens/s on 1 GPU), against the phase with the
same numerics and size.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # import this checkout's omni_moe, installed or not

from omni_moe import OmniMoE, OmniMoEConfig, param_groups  # noqa: E402
from omni_moe.distributed import data_parallel, fully_shard_model, shard_expert_tables  # noqa: E402


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.moe = OmniMoE(cfg)

    def forward(self, x):
        return x + self.moe(self.norm(x))


class Net(nn.Module):
    def __init__(self, vocab, cfg, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.hidden_size)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(layers))
        self.norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return F.linear(self.norm(x), self.embed.weight)


def _token_counts(text: str) -> list[int]:
    """--global-tokens: one or more positive ints, comma-separated."""
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"--global-tokens takes positive integers separated by commas, got {text!r}")
    return sizes


PHASES = ("1gpu", "1gpu_fsdp", "ddp", "fsdp", "ddp_sharded", "fsdp_keep", "ddp_bf16")
# 2-GPU phase -> the 1-GPU phase of the same numerics (scaling efficiency)
BASELINE = {"ddp": "1gpu", "fsdp": "1gpu_fsdp", "ddp_sharded": "1gpu", "fsdp_keep": "1gpu_fsdp",
            "ddp_bf16": "1gpu"}


def _phase_names(text: str) -> str:
    """--phases: known names, comma-separated (may be empty: only --big runs)."""
    bad = [p for p in text.split(",") if p and p not in PHASES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"--phases: unknown phase(s) {', '.join(bad)}; choose from {', '.join(PHASES)}")
    return text


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="small sizes (CPU / gloo smoke run)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--experts", type=int, default=65536)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--global-tokens", type=_token_counts, default=[16384],
                   help="tokens per step, all ranks; comma-separated to sweep, e.g. 16384,65536")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--big", action="store_true", help="also the --big-phases at --big-experts experts")
    p.add_argument("--big-phases", type=_phase_names, default="ddp_sharded,fsdp,ddp,1gpu,1gpu_fsdp",
                   help="phases of the --big model, comma-separated")
    p.add_argument("--big-experts", type=int, default=1 << 20)
    p.add_argument("--big-layers", type=int, default=1, help="blocks of the --big model")
    p.add_argument("--phases", type=_phase_names, default="1gpu,1gpu_fsdp,ddp,fsdp,ddp_sharded",
                   help="comma-separated, of: " + ",".join(PHASES))
    p.add_argument("--optimizer", default="fused", choices=("fused", "foreach"),
                   help="AdamW implementation: one fused kernel per step (default) or torch's "
                        "multi-tensor (foreach) steps")
    p.add_argument("--trace", metavar="DIR",
                   help="also profile one extra step of every phase (torch.profiler): a Chrome trace "
                        "per rank, DIR/<tokens>_<phase>_rank<r>.json.gz, and its summary (compute, "
                        "NCCL, exposed NCCL, idle; omni_moe.bench.trace) in the JSON rows")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    if a.tiny:
        # new defaults: sizes given on the command line still win
        p.set_defaults(hidden=32, intermediate=48, experts=256, topk=4, layers=2, vocab=64,
                       global_tokens=[256], steps=6, warmup=2, big_experts=1024)
        a = p.parse_args(argv)
    return a


def batch(step, a, tokens, device):
    g = torch.Generator().manual_seed(1000 + step)
    prev = torch.randint(0, a.vocab, (tokens,), generator=g)
    nxt = (31 * prev + 7 + torch.randint(0, 4, (tokens,), generator=g)) % a.vocab
    return prev.to(device), nxt.to(device)


PARTS = {"forward": "fwd", "backward": "bwd", "optimizer": "opt"}   # JSON key: printed label


class StepMarks:
    """Points of one step on rank 0's timeline: CUDA events on the current stream (read
    once the step has synchronised, so marking adds no sync), or the host clock on CPU,
    where the step runs synchronously."""

    def __init__(self, cuda: bool):
        self.cuda, self.points = cuda, []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.points.append(e)
        else:
            self.points.append(time.perf_counter())

    def spans_ms(self) -> list[float]:
        p = self.points
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(p, p[1:])]
        return [1e3 * (b - a) for a, b in zip(p, p[1:])]


def build(a, experts, layers, device, single):
    # sync_router_stats=False in the 1-GPU phases: rank 1 is not taking part.
    cfg = OmniMoEConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_experts=experts,
                        num_experts_per_token=a.topk, sync_router_stats=False if single else None)
    torch.manual_seed(0)
    with torch.device(device):
        return Net(a.vocab, cfg, layers)


def _profiled_step(a, train_step, stem):
    """One more step (after the timed ones, so it changes none of them) under
    torch.profiler: its Chrome trace under --trace, and the trace's summary."""
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile

    from omni_moe.bench.trace import format_summary, load_trace, summarise

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        train_step(a.steps)
    os.makedirs(a.trace, exist_ok=True)
    raw = os.path.join(a.trace, stem + ".json")
    prof.export_chrome_trace(raw)
    summary = summarise(load_trace(raw))
    with open(raw, "rb") as f, gzip.open(raw + ".gz", "wb") as g:
        shutil.copyfileobj(f, g)
    os.remove(raw)
    summary["path"] = raw + ".gz"
    if stem.endswith("_rank0"):
        print(f"trace {stem}: " + format_summary(summary), flush=True)
    return summary


def run_phase(name, a, tokens, experts, layers, device, rank, world, mesh_all, key=None):
    single = name.startswith("1gpu")
    P = 1 if single else world
    key = key or name
    model = build(a, experts, layers, device, single)
    if name == "1gpu_fsdp":
        from torch.distributed.device_mesh import DeviceMesh

        mesh = DeviceMesh.from_group(_G0, device.type)
        model = fully_shard_model(model, mesh, blocks=list(model.blocks))
    elif name in ("fsdp", "fsdp_keep"):
        model = fully_shard_model(model, mesh_all, blocks=list(model.blocks),
                                  reshard_after_forward=name == "fsdp")
    elif name in ("ddp", "ddp_bf16"):
        model = data_parallel(model)
        if name == "ddp_bf16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif name == "ddp_sharded":
        shard_expert_tables(model, mesh_all)
        model = data_parallel(model)
    # The expert tables in their own group: sharded, they are DTensors, and one
    # multi-tensor optimizer step cannot mix them with plain tensors.
    opt = torch.optim.AdamW(param_groups(model, lr=a.lr), betas=(0.9, 0.95), weight_decay=0.0,
                            **{a.optimizer: True})
    n = tokens // P
    losses, times, parts = [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    def train_step(step):
        inp, tgt = batch(step, a, tokens, device)
        inp, tgt = inp[rank * n:(rank + 1) * n], tgt[rank * n:(rank + 1) * n]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks = StepMarks(device.type == "cuda")
        t0 = time.perf_counter()
        marks.mark()
        loss = F.cross_entropy(model(inp).float(), tgt)
        marks.mark()
        loss.backward()
        marks.mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.mark()
        lv = loss.detach().double().reshape(1)
        if P > 1:
            dist.all_reduce(lv)
        lv = float(lv) / P  # synchronises
        return time.perf_counter() - t0, marks.spans_ms(), lv

    for step in range(a.steps):
        t, spans, lv = train_step(step)
        times.append(t)
        parts.append(spans)
        losses.append(lv)
    trace = _profiled_step(a, train_step, f"{tokens}_{key}_rank{rank}") if a.trace else None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    step_s = statistics.median(times[a.warmup:]) if len(times) > a.warmup else float("nan")
    timed = parts[a.warmup:]
    # Medians per part (robust to one slow step), so they need not add up to step_ms;
    # fwd_bwd is the median of the per-step sums.
    breakdown = {k: statistics.median(p[i] for p in timed) if timed else float("nan")
                 for i, k in enumerate(PARTS)}
    breakdown["fwd_bwd"] = statistics.median(p[0] + p[1] for p in timed) if timed else float("nan")
    n_params = sum(p.numel() for p in model.parameters())
    out = {"world": P, "experts": experts, "layers": layers, "global_tokens": tokens, "loss": losses,
           "step_ms": 1e3 * step_s, "tokens_per_s": tokens / step_s, "peak_mem_gib": peak,
           "breakdown_ms": breakdown, "step_parts_ms": parts, "params": n_params,
           "optimizer": a.optimizer}
    if trace is not None:
        out["trace"] = trace
    return out


_G0 = None


def main(argv=None):
    global _G0
    a = parse(argv)
    if "LOCAL_RANK" not in os.environ:
        print("launch with torchrun --nproc-per-node 2 benchmarks/distributed.py ...", file=sys.stderr)
        return 2
    local = int(os.environ["LOCAL_RANK"])
    if a.device == "cuda":
        if not torch.cuda.is_available():
            print("CUDA is not available; use --device cpu --tiny", file=sys.stderr)
            return 2
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.backends.cuda.matmul.allow_tf32 = True
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    waiter = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=30))
    _G0 = dist.new_group([0])
    if rank == 0:
        from omni_moe.bench.common import report_threads

        report_threads("distributed.py", processes=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh_all = init_device_mesh(device.type, (world,))
    phases = [p for p in a.phases.split(",") if p]
    plan = []
    for tokens in a.global_tokens:
        plan += [(tokens, p, a.experts, a.layers) for p in phases]
        if a.big:
            # 2 GPUs first: a 1-GPU out-of-memory can leave the allocator fragmented
            big = sorted((p for p in a.big_phases.split(",") if p), key=lambda p: p.startswith("1gpu"))
            plan += [(tokens, p, a.big_experts, a.big_layers) for p in big]
    by_tokens = {t: {} for t in a.global_tokens}
    for tokens, name, experts, layers in plan:
        results = by_tokens[tokens]
        key = name if experts == a.experts else f"{name}_E{experts}"
        if name.startswith("1gpu") and rank != 0:
            dist.barrier(group=waiter)
            continue
        try:
            res = run_phase(name, a, tokens, experts, layers, device, rank, world, mesh_all, key)
        except torch.OutOfMemoryError as e:
            res = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        if device.type == "cuda":
            gc.collect()   # the phase's model and optimizer (DDP/FSDP hooks hold cycles)
            torch.cuda.empty_cache()
        if name.startswith("1gpu"):
            dist.barrier(group=waiter)
        else:
            # peak memory of every rank
            mem = torch.tensor([res.get("peak_mem_gib") or -1.0], dtype=torch.float64, device=device)
            allm = [torch.zeros_like(mem) for _ in range(world)]
            dist.all_gather(allm, mem)
            if "error" not in res:
                res["peak_mem_gib_per_rank"] = [float(m) for m in allm]
        results[key] = res
        if rank == 0:
            print(f"{key:20s} {tokens:>7d} tok/step " + (res["error"] if "error" in res else
                  f"{res['tokens_per_s']:12,.0f} tok/s  {res['step_ms']:8.2f} ms/step  "
                  + "  ".join(f"{v} {res['breakdown_ms'][k]:7.2f}" for k, v in PARTS.items()) + " ms  "
                  f"peak {res['peak_mem_gib'] or 0:6.2f} GiB  loss {res['loss'][0]:.3f} -> {res['loss'][-1]:.3f}"),
                  flush=True)
    if rank == 0:
        sweep = {}
        for tokens, results in by_tokens.items():
            summary = {}
            for two, one in (*BASELINE.items(),
                             *((f"{t}_E{a.big_experts}", f"{o}_E{a.big_experts}") for t, o in BASELINE.items())):
                r2, r1 = results.get(two), results.get(one)
                if r2 and r1 and "error" not in r2 and "error" not in r1:
                    summary[f"{two}_vs_{one}"] = {
                        "scaling_efficiency": r2["tokens_per_s"] / (2 * r1["tokens_per_s"]),
                        "loss_max_abs_diff": max(abs(x - y) for x, y in zip(r2["loss"], r1["loss"])),
                    }
            for k, v in summary.items():
                print(f"{k:28s} {tokens:>7d} tok/step  scaling efficiency {v['scaling_efficiency']:.3f}  "
                      f"max |loss diff| {v['loss_max_abs_diff']:.2e}")
            sweep[str(tokens)] = {"phases": results, "comparisons": summary}
        first = sweep[str(a.global_tokens[0])]
        # "phases" and "comparisons" hold the first size, as when one size was the only
        # choice; "by_tokens" holds every size.
        out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "world": world, "args": vars(a), "loss_floor": math.log(4), "phases": first["phases"],
               "comparisons": first["comparisons"], "global_tokens": a.global_tokens,
               "by_tokens": sweep}
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
            print(f"wrote {a.json}")
    dist.barrier(group=waiter)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
