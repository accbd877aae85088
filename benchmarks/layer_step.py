"""One OmniMoE training step: time per step (eager and CUDA-graph replay), peak memory,
launches and autograd nodes; dense vs sparse expert gradients; the dense MLP alongside.

Run on a CUDA machine from the repository root:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/layer_step.py [--cases 0,1,2] [--steps 50]

For each case (T, H, I, E, k), bf16, silu, BatchNorm router norm, training mode:
  - counts of one eager forward + backward (``omni_moe.bench.launch_count.step_counts``,
    torch.profiler for the CUDA kernels);
  - eager step = forward + loss + backward + optimizer step, ms per step over ``--steps``
    steps (wall clock between two synchronisations: what a training loop sees):
    dense gradients + SGD, sparse gradients + SGD (same math), sparse gradients with the
    tables updated by ``omni_moe.optim.RowSGD`` (same math, one row-update kernel per
    table instead of torch's ``index_add_``) and the dense MLP alone;
  - the dense step and the MLP step captured in one CUDA graph each and replayed;
  - peak memory above the resident weights of one dense / sparse forward + backward.
Writes $OUT/layer_step.json (default ./out) and prints a table.  ``--dry`` runs tiny
sizes on CPU (TRITON_INTERPRET=1) to test the script (no graphs, no profiler).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # import this checkout's omni_moe, installed or not

CASES = [(4096, 1024, 4096, 4096, 16), (8192, 1024, 4096, 65536, 32), (4096, 2048, 8192, 1048576, 16)]
DRY_CASES = [(48, 32, 48, 64, 4), (40, 24, 32, 400, 3)]


class _Both:
    """Two optimizers stepped as one (the tables' and the rest's)."""

    def __init__(self, *opts):
        self.opts = opts

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self):
        for o in self.opts:
            o.step()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=None, help="comma-separated case numbers (default: all)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dry", action="store_true")
    args = ap.parse_args()
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from omni_moe import OmniMoE, OmniMoEConfig, param_groups
    from omni_moe.bench.launch_count import step_counts
    from omni_moe.optim import RowSGD
    from omni_moe.bench.common import DenseMLP, capture_graph, report_threads

    report_threads("layer_step.py")
    dev = "cpu" if args.dry else "cuda"
    dtype = torch.float32 if args.dry else torch.bfloat16
    cases = DRY_CASES if args.dry else CASES
    if args.cases:
        cases = [cases[int(i)] for i in args.cases.split(",")]
    steps = 3 if args.dry else args.steps
    sync = (lambda: None) if args.dry else torch.cuda.synchronize

    def per_step_ms(step, n):
        for _ in range(3):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return (time.perf_counter() - t0) * 1e3 / n

    def train_step(model, opt, x):
        def step():
            opt.zero_grad(set_to_none=True)
            model(x).float().square().mean().backward()
            opt.step()
        return step

    def graph_ms(model, x, n):
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        def body():
            model(x).float().square().mean().backward()
            opt.step()
        # The graph allocates (and overwrites) the grads: no zero_grad inside it.
        g = capture_graph(body, warmup=train_step(model, opt, x),
                          before_capture=lambda: opt.zero_grad(set_to_none=True))
        return per_step_ms(g.replay, n)

    def peak_mb(model, x):
        for p in model.parameters():
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(x).float().square().mean().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        for p in model.parameters():
            p.grad = None
        return peak / 2**20

    results = []
    for (T, H, I, E, k) in cases:
        row = {"case": [T, H, I, E, k]}
        torch.manual_seed(0)
        layer = OmniMoE(OmniMoEConfig(H, I, num_experts=E, num_experts_per_token=k)).to(dev).to(dtype)
        x = torch.randn(T, H, device=dev, dtype=dtype)
        counts = step_counts(layer, x, profile_cuda=not args.dry)
        row["triton_launches"] = counts["triton_launches"]
        row["autograd_nodes"] = counts["autograd_nodes"]
        if "cuda" in counts:
            row["cuda_kernels"] = counts["cuda"]["kernels"]
            row["cuda_launch_calls"] = counts["cuda"]["launch_calls"]
        for key in ("dense", "sparse", "sparse_row"):
            sparse = key != "dense"
            layer.up_embed.sparse = layer.down_embed.sparse = sparse
            if key == "sparse_row":
                rest, tables = param_groups(layer, lr=1e-4, split=True)
                opt = _Both(torch.optim.SGD([rest], lr=1e-4), RowSGD(tables["params"], lr=1e-4))
            else:
                opt = torch.optim.SGD(layer.parameters(), lr=1e-4)
            row[f"eager_step_ms_{key}"] = per_step_ms(train_step(layer, opt, x), steps)
            if not args.dry and key != "sparse_row":
                row[f"peak_mb_{key}"] = peak_mb(layer, x)
        layer.up_embed.sparse = layer.down_embed.sparse = False
        mlp = DenseMLP(H, I).to(dev).to(dtype)
        row["eager_step_ms_mlp"] = per_step_ms(train_step(mlp, torch.optim.SGD(mlp.parameters(), lr=1e-4), x),
                                               steps)
        if not args.dry:
            row["peak_mb_mlp"] = peak_mb(mlp, x)
            row["graph_step_ms_dense"] = graph_ms(layer, x, steps)
            row["graph_step_ms_mlp"] = graph_ms(mlp, x, steps)
        results.append(row)
        print(json.dumps(row), flush=True)
        del layer, mlp
        if not args.dry:
            torch.cuda.empty_cache()
    out_dir = os.environ.get("OUT", os.path.join(ROOT, "out"))
    os.makedirs(out_dir, exist_ok=True)
    meta = {"torch": torch.__version__, "device": "cpu (dry)" if args.dry else torch.cuda.get_device_name(),
            "dtype": str(dtype), "steps": steps, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(os.path.join(out_dir, "layer_step.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    cols = ["eager_step_ms_dense", "eager_step_ms_sparse", "eager_step_ms_sparse_row", "eager_step_ms_mlp", "graph_step_ms_dense",
            "graph_step_ms_mlp", "peak_mb_dense", "peak_mb_sparse", "peak_mb_mlp", "triton_launches",
            "cuda_kernels", "autograd_nodes"]
    print("case | " + " | ".join(cols))
    for r in results:
        vals = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols]
        print(",".join(map(str, r["case"])) + " | " + " | ".join(vals))


if __name__ == "__main__":
    main()
