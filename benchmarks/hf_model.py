#!/usr/bin/env python
"""Training throughput and peak memory of a Llama-style decoder: dense vs converted to
OmniMoE (``apply_omnimoe``) vs the native ``OmniMoEForCausalLM``, in one run.

Default sizes (GPU): 12 layers, width 768, 12 heads, shared/dense MLP width 2048,
vocabulary 32000, batch 8 x 1024 tokens, bf16 weights and AdamW, SDPA attention;
OmniMoE layers in every decoder layer with E = 16384 (128^2) experts, k = 16.

    python benchmarks/hf_model.py --json hf_model.json    # CUDA, ~2 min on an H100
    python benchmarks/hf_model.py --tiny                  # CPU smoke run (prints only)

Each model is built, warmed up (``--warmup`` steps: Triton compiles and autotunes
there), then timed over ``--steps`` optimizer steps (forward, backward, AdamW) with the
device synchronised at both ends.  Peak memory is ``torch.cuda.max_memory_allocated``
over warm-up and timed steps, with the statistics reset per model.  The converted model
starts from the dense model's weights (same seed); its first loss is reported next to the
dense one (equal up to bf16 GEMM rounding: the expert tables start at zero).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # import this checkout's omni_moe, installed or not

from omni_moe.bench.common import add_model_size_arguments  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU smoke run")
    add_model_size_arguments(p, layers=12, hidden=768, heads=12, experts=16384, k=16)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--converted-norm", default="layernorm", help="router_norm of the converted model")
    p.add_argument("--native-norm", default="batchnorm", help="router_norm of the native model")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--models", default="dense,converted,native")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing on")
    p.add_argument("--device", default=None)
    if p.parse_known_args(argv)[0].tiny:  # tiny defaults; options given still win
        p.set_defaults(layers=2, hidden=64, heads=4, intermediate=128, vocab=256, batch=2, seq=32,
                       experts=64, k=4, steps=2, warmup=1)
    return p.parse_args(argv)


def llama_config(args):
    from transformers import LlamaConfig

    return dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                num_hidden_layers=args.layers, num_attention_heads=args.heads,
                num_key_value_heads=args.heads, max_position_embeddings=args.seq,
                bos_token_id=None, eos_token_id=None), LlamaConfig


def build(name, args, dtype, device):
    import omni_moe.hf as ohf
    from transformers import LlamaForCausalLM

    fields, LlamaConfig = llama_config(args)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device (the expert tables are large)
        model = _make(name, args, fields, LlamaConfig, ohf, LlamaForCausalLM)
    model.set_attn_implementation("sdpa")
    model = model.to(dtype=dtype)
    if args.grad_ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model


def _make(name, args, fields, LlamaConfig, ohf, LlamaForCausalLM):
    if name in ("dense", "converted"):
        model = LlamaForCausalLM(LlamaConfig(**fields))
        if name == "converted":
            ohf.apply_omnimoe(model, num_experts=args.experts, num_experts_per_tok=args.k,
                              router_norm=args.converted_norm)
    elif name == "native":
        model = ohf.OmniMoEForCausalLM(ohf.OmniMoELMConfig(
            **fields, num_experts=args.experts, num_experts_per_tok=args.k, router_norm=args.native_norm))
    else:
        raise ValueError(f"--models: unknown model {name!r} (dense, converted, native)")
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(name, args, dtype, device):
    model = build(name, args, dtype, device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
               for _ in range(2)]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    losses = []

    def step(i):
        x = batches[i % 2]
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup):
        losses.append(step(i).item())
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        last = step(i)
    sync(device)
    dt = time.perf_counter() - t0
    losses.append(last.item())
    tokens = args.steps * args.batch * args.seq
    res = {
        "params": params,
        "tokens_per_s": tokens / dt,
        "step_ms": 1e3 * dt / args.steps,
        "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    if name != "dense":
        res["router_norm"] = model.config.router_norm
    del model, opt, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import omni_moe.hf  # noqa: F401
        import transformers
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    names = [s.strip() for s in args.models.split(",") if s.strip()]
    try:
        if args.experts < 1 or math.isqrt(args.experts) ** 2 != args.experts:
            # The models are new: a count that is not a perfect square would leave rows
            # that are never routed (allowed only to load upstream checkpoints).
            raise ValueError(f"--experts must be a perfect square N*N >= 1, got {args.experts}")
        for norm, option in ((args.converted_norm, "--converted-norm"), (args.native_norm, "--native-norm")):
            omni_moe.hf.configuration.validate_omnimoe_fields(
                args.experts, args.k, norm, None, args.layers, "silu",
                names={"num_experts": "--experts", "num_experts_per_tok": "--k", "router_norm": option})
        for n in names:
            if n not in ("dense", "converted", "native"):
                raise ValueError(f"--models: unknown model {n!r} (dense, converted, native)")
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    from omni_moe.bench.common import report_threads

    report_threads("hf_model.py")
    import triton

    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "dtype": args.dtype, "grad_ckpt": args.grad_ckpt,
        "shape": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "intermediate", "vocab",
                                                "batch", "seq", "experts", "k", "steps", "warmup")},
        "results": {},
    }
    for n in names:
        t = time.perf_counter()
        out["results"][n] = r = run_one(n, args, dtype, device)
        mem = f"{r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "n/a"
        print(f"{n:10s} {r['params'] / 1e6:8.1f}M params  {r['tokens_per_s']:12,.0f} tok/s  "
              f"{r['step_ms']:9.1f} ms/step  peak {mem}  loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}  "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
