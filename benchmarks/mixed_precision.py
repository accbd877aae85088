"""Mixed-precision training of OmniMoE layers: the recipes users run, checked and timed.

Run on a CUDA machine from the repository root:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/mixed_precision.py [--steps 30]

1. The layer's training step (forward, loss, backward, optimizer step) for each router norm,
   dense and sparse expert gradients, in four recipes:
     bf16             bf16 weights (no autocast; the baseline)
     amp-bf16         float32 weights, the forward under torch.autocast(bf16)
     amp-bf16-tables  the same with the two expert tables in bf16 (what reaches the expert
                      op's "dense" schedule at K >= E/32; docs/layer.md, Mixed precision)
     amp-fp16         float32 weights, torch.autocast(fp16) and torch.amp.GradScaler
   Each row checks the step (the loss falls over the steps on a fixed regression target,
   every weight stays finite, gradients come back in the weights' dtype) and reports the
   eager ms per step (wall clock between two synchronisations) and, for dense gradients
   without a GradScaler, the step captured in a CUDA graph and replayed.
2. transformers' Trainer(bf16=True) and Trainer(fp16=True) training a small
   OmniMoEForCausalLM (float32 weights) on the shipped text: loss first/last, steps/s.

Writes $OUT/mixed_precision.json (default ./out) and prints a table.  ``--dry`` runs tiny
sizes on CPU (the PyTorch paths, no graphs, Trainer bf16 only) to test the script.
``--recipes``, ``--norms`` and ``--grads`` pick subsets, e.g. the paper's largest row:

    python benchmarks/mixed_precision.py --case 4096,1024,1024,102400,4096 --norms batchnorm \
        --grads dense --recipes bf16,amp-bf16,amp-bf16-tables --no-trainer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # import this checkout's omni_moe, installed or not

RECIPES = ("bf16", "amp-bf16", "amp-bf16-tables", "amp-fp16")
NORMS = ("batchnorm", "layernorm", "none")
GRADS = ("dense", "sparse")


def _subset(allowed):
    def parse(text):
        names = [v for v in text.split(",") if v]
        bad = [v for v in names if v not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, "
                                             f"got {text!r}")
        return [v for v in allowed if v in names]
    return parse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="4096,1024,4096,16384,16", help="T,H,I,E,k of the layer rows")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per row")
    ap.add_argument("--trainer-steps", type=int, default=40)
    ap.add_argument("--no-trainer", action="store_true", help="skip the Trainer rows")
    ap.add_argument("--dry", action="store_true", help="tiny sizes on CPU (tests the script)")
    ap.add_argument("--recipes", type=_subset(RECIPES), default=list(RECIPES),
                    help=f"comma-separated subset of {','.join(RECIPES)} (default all)")
    ap.add_argument("--norms", type=_subset(NORMS), default=list(NORMS),
                    help=f"router norms, a subset of {','.join(NORMS)} (default all)")
    ap.add_argument("--grads", type=_subset(GRADS), default=list(GRADS),
                    help="expert gradient layouts, a subset of dense,sparse (default both)")
    args = ap.parse_args(argv)
    try:
        T, H, I, E, k = (int(v) for v in args.case.split(","))
    except ValueError:
        ap.error(f"--case must be five integers T,H,I,E,k, got {args.case!r}")
    if args.dry:
        T, H, I, E, k = 64, 32, 48, 64, 4
        args.steps, args.trainer_steps = 2, 4
    import torch

    from omni_moe import OmniMoE, OmniMoEConfig
    from omni_moe.bench.common import capture_graph, environment

    dev = "cpu" if args.dry else "cuda"
    sync = (lambda: None) if args.dry else torch.cuda.synchronize

    def make_step(layer, recipe, x, target):
        tables = [layer.up_embed.weight, layer.down_embed.weight]
        rest = [p for p in layer.parameters() if all(p is not t for t in tables)]
        if layer.up_embed.sparse:
            opts = [torch.optim.SparseAdam(tables, lr=1e-3), torch.optim.AdamW(rest, lr=1e-3)]
        else:
            opts = [torch.optim.AdamW(layer.parameters(), lr=1e-3, capturable=dev == "cuda")]
        amp = {"amp-bf16": torch.bfloat16, "amp-bf16-tables": torch.bfloat16,
               "amp-fp16": torch.float16}.get(recipe)
        scaler = torch.amp.GradScaler(dev) if recipe == "amp-fp16" else None
        losses = []

        def step():
            with torch.autocast(dev, dtype=amp or torch.bfloat16, enabled=amp is not None):
                out = layer(x)
            loss = (out.float() - target).square().mean()
            (scaler.scale(loss) if scaler else loss).backward()
            for o in opts:
                if scaler:
                    scaler.step(o)
                else:
                    o.step()
                o.zero_grad(set_to_none=False if not layer.up_embed.sparse else True)
            if scaler:
                scaler.update()
            losses.append(loss.detach())
        return step, losses

    def per_step_ms(step, n):
        for _ in range(3):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return (time.perf_counter() - t0) * 1e3 / n

    def graph_ms(step, n):
        return per_step_ms(capture_graph(step).replay, n)

    rows = []
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=gen).to(dev)
    target = torch.randn(T, H, generator=gen).to(dev)
    for norm in args.norms:
        for sparse in (g == "sparse" for g in args.grads):
            for recipe in args.recipes:
                torch.manual_seed(0)
                cfg = OmniMoEConfig(H, I, num_experts=E, num_experts_per_token=k, router_norm=norm,
                                    sparse_expert_grad=sparse)
                layer = OmniMoE(cfg).to(dev)
                if recipe == "bf16":
                    layer = layer.bfloat16()
                elif recipe == "amp-bf16-tables":
                    layer.up_embed.bfloat16()
                    layer.down_embed.bfloat16()
                xin = x.to(torch.bfloat16) if recipe == "bf16" else x
                step, losses = make_step(layer, recipe, xin, target)
                row = {"norm": norm, "grads": "sparse" if sparse else "dense", "recipe": recipe}
                row["eager_ms"] = round(per_step_ms(step, args.steps), 3)
                ls = [float(v) for v in losses]
                finite = all(bool(torch.isfinite(p).all()) for p in layer.parameters())
                dtypes_ok = all(p.grad is None or p.grad.dtype == p.dtype for p in layer.parameters())
                row.update(loss_first=round(ls[0], 5), loss_last=round(ls[-1], 5),
                           ok=bool(finite and dtypes_ok and ls[-1] < ls[0]))
                if not args.dry and not sparse and recipe != "amp-fp16":
                    row["graph_ms"] = round(graph_ms(step, args.steps), 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
                del layer, step
    trainer_rows = [] if args.no_trainer else trainer_runs(args, dev)
    out_dir = os.environ.get("OUT", os.path.join(ROOT, "out"))
    os.makedirs(out_dir, exist_ok=True)
    meta = {**environment(), "case": [T, H, I, E, k], "steps": args.steps, "dry": args.dry,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(os.path.join(out_dir, "mixed_precision.json"), "w") as f:
        json.dump({"meta": meta, "layer": rows, "trainer": trainer_rows}, f, indent=1)
    print(f"\nlayer step, T,H,I,E,k = {T},{H},{I},{E},{k}: ms per step (eager / CUDA graph)")
    print(f"{'norm':10} {'grads':6} " + " ".join(f"{r:>18}" for r in args.recipes))
    for norm in args.norms:
        for grads in args.grads:
            cells = []
            for recipe in args.recipes:
                r = next(r for r in rows if (r["norm"], r["grads"], r["recipe"]) == (norm, grads, recipe))
                g = f" / {r['graph_ms']:.2f}" if "graph_ms" in r else ""
                cells.append(f"{r['eager_ms']:.2f}{g}{'' if r['ok'] else ' FAIL'}".rjust(18))
            print(f"{norm:10} {grads:6} " + " ".join(cells))
    for r in trainer_rows:
        print(f"Trainer({r['precision']}=True): loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, "
              f"{r['steps_per_s']:.2f} steps/s, {'ok' if r['ok'] else 'FAIL'}")
    return 0 if all(r["ok"] for r in rows + trainer_rows) else 1


def trainer_runs(args, dev):
    """Trainer(bf16=True) / Trainer(fp16=True) on a small OmniMoEForCausalLM."""
    import tempfile

    import torch
    try:
        import omni_moe.hf as ohf
        from transformers import Trainer, TrainingArguments
    except ImportError as e:
        print(f"Trainer rows skipped: {e}", flush=True)
        return []
    text = open(os.path.join(ROOT, "examples", "data", "lighthouse.txt"), "rb").read()
    data = torch.tensor(list(text), dtype=torch.long)
    seq = 32 if args.dry else 256
    n = (data.numel() - 1) // seq
    samples = [{"input_ids": data[i * seq:(i + 1) * seq], "labels": data[i * seq:(i + 1) * seq]}
               for i in range(n)]
    size = (dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                 num_experts=64, num_experts_per_tok=4) if args.dry else
            dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_experts=4096, num_experts_per_tok=16))
    rows = []
    for precision in (("bf16",) if args.dry else ("bf16", "fp16")):
        torch.manual_seed(0)
        model = ohf.OmniMoEForCausalLM(ohf.OmniMoELMConfig(vocab_size=256, router_norm="batchnorm", **size))
        with tempfile.TemporaryDirectory() as tmp:
            targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=8 if args.dry else 16,
                                      max_steps=args.trainer_steps, learning_rate=3e-3, logging_steps=1,
                                      save_strategy="no", report_to=[], seed=0, use_cpu=dev == "cpu",
                                      **{precision: True})
            trainer = Trainer(model=model, args=targs, train_dataset=samples)
            out = trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        row = {"precision": precision, "loss_first": losses[0], "loss_last": losses[-1],
               "steps": len(losses), "steps_per_s": out.metrics["train_steps_per_second"],
               "weights": str(next(model.parameters()).dtype),
               "ok": bool(finite and losses[-1] < losses[0])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
