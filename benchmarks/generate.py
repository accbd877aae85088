#!/usr/bin/env python
"""Generation throughput: greedy ``generate()`` of a dense Llama and of OmniMoE decoders
with the same active parameters, tokens per second at several batch sizes.

    python benchmarks/generate.py --json generate.json     # CUDA
    python benchmarks/generate.py --preset paper           # many requests, long generations
    python benchmarks/generate.py --tiny                   # CPU smoke run

Models (same trunk: --layers decoder layers of width --hidden, --heads heads, vocabulary
--vocab, SDPA attention, bf16 weights on CUDA):

  dense      ``LlamaForCausalLM`` with MLP width --dense-width;
  omnimoe    ``OmniMoEForCausalLM``: shared SwiGLU of width --shared-width, E = --experts
             atomic experts, K per token solving 3 H I_dense = 3 H I_shared + 2 N H + 2 K H
             (the dense MLP's active parameters; N = sqrt(E)), unless --k is given;
  converted  the dense Llama after ``apply_omnimoe`` with the same E and K: its MLP stays
             (as the shared MLP), so it has 2 N H + 2 K H more active parameters.

Each model runs every batch size B of --batches: a random prompt of --prompt tokens per
request, --new tokens generated greedily (``do_sample=False``; no EOS, every request runs
to the end).  Modes (--modes): ``dynamic`` (DynamicCache, eager), ``static`` (static
cache, ``disable_compile``), ``compiled`` (static cache; transformers compiles the decode
step with CUDA graphs on CUDA -- ``compiled`` is skipped elsewhere).  One untimed call
first (compilation, autotuning), then --reps timed calls; the median is reported as
tokens/s = B * new / seconds, with the prefill alone (a call with one new token) timed the
same way and the decode step's ms = (generate - prefill) / (new - 1).

Check: each mode's tokens against the ``dynamic`` mode's for the first batch size, as the
fraction of generated tokens that agree up to the first difference per request (bf16
ties may split them legitimately; float32 on CPU they agree).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's omni_moe, installed or not

from omni_moe.bench.common import ArgumentParser, UsageError, add_model_size_arguments, environment  # noqa: E402

MODELS = ("dense", "omnimoe", "converted")
MODES = ("dynamic", "static", "compiled")


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _names(choices):
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [n for n in names if n not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}, got {text!r}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write rows and environment here")
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (a smoke run)")
    p.add_argument("--preset", choices=("paper",), default=None,
                   help="paper: 40 requests, 512-token prompts, 1024 new tokens (the paper's batched "
                        "serving setting, generations shortened to fit one GPU's time)")
    p.add_argument("--models", type=_names(MODELS), default=list(MODELS))
    p.add_argument("--modes", type=_names(MODES), default=list(MODES))
    p.add_argument("--batches", type=_ints, default=[1, 8, 64], help="requests per call (default 1,8,64)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per request (default 128)")
    p.add_argument("--new", type=int, default=128, help="generated tokens per request (default 128)")
    p.add_argument("--reps", type=int, default=3, help="timed calls per cell (default 3)")
    add_model_size_arguments(p, layers=8, hidden=1024, heads=16, experts=65536, k=None,
                             experts_help="E, a perfect square (default 65536)",
                             k_help="experts per token (default: match the dense model)")
    p.add_argument("--dense-width", type=int, default=4096)
    p.add_argument("--shared-width", type=int, default=2048)
    p.add_argument("--router-norm", choices=("layernorm", "batchnorm", "none"), default="layernorm")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p


def parse_args(argv=None):
    p = build_parser()
    pre = p.parse_known_args(argv)[0]
    if pre.tiny:  # toy defaults; options given still win
        p.set_defaults(layers=2, hidden=64, heads=4, vocab=256, dense_width=192, shared_width=128,
                       experts=256, batches=[1, 4], prompt=8, new=6, reps=1, modes=["dynamic", "static"])
    if pre.preset == "paper":
        p.set_defaults(batches=[40], prompt=512, new=1024, reps=1)
    args = p.parse_args(argv)
    n = math.isqrt(args.experts)
    if n * n != args.experts:
        p.error(f"--experts must be a perfect square, got {args.experts}")
    for name in ("prompt", "new", "reps", "layers", "hidden", "heads", "vocab", "dense_width", "shared_width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.new < 2:
        p.error("--new must be >= 2 (the decode step's time is (generate - prefill) / (new - 1))")
    if args.hidden % args.heads:
        p.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    if args.k is None:
        extra = 3 * (args.dense_width - args.shared_width) - 2 * n
        if extra < 2:
            p.error("the dense model has too few active parameters for a matched K: "
                    "give --k or a wider --dense-width")
        args.k = extra // 2
    if not 1 <= args.k <= args.experts:
        p.error(f"--k must be in [1, {args.experts}], got {args.k}")
    return args


def active_ffn_params(name: str, args) -> int:
    """Parameters of one decoder layer's FFN that one token uses."""
    H, n = args.hidden, math.isqrt(args.experts)
    if name == "dense":
        return 3 * H * args.dense_width
    experts = 2 * n * H + 2 * args.k * H
    return experts + 3 * H * (args.shared_width if name == "omnimoe" else args.dense_width)


def build(name: str, args, dtype, device):
    import omni_moe.hf as ohf
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.heads,
                  max_position_embeddings=args.prompt + args.new, bos_token_id=None, eos_token_id=None,
                  pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        if name == "omnimoe":
            model = ohf.OmniMoEForCausalLM(ohf.OmniMoELMConfig(
                **fields, intermediate_size=args.shared_width, num_experts=args.experts,
                num_experts_per_tok=args.k, router_norm=args.router_norm))
        else:
            model = LlamaForCausalLM(LlamaConfig(**fields, intermediate_size=args.dense_width))
            if name == "converted":
                ohf.apply_omnimoe(model, num_experts=args.experts, num_experts_per_tok=args.k,
                                  router_norm=args.router_norm)
    model.set_attn_implementation("sdpa")
    return model.to(dtype=dtype).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(model, prompt, new: int, mode: str):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False,
              attention_mask=torch.ones_like(prompt))
    if mode != "dynamic":
        kw["cache_implementation"] = "static"
    if mode == "static":
        kw["disable_compile"] = True
    with torch.inference_mode():
        return model.generate(prompt, **kw)


def timed(fn, reps: int, device) -> float:
    fn()  # compilation, autotuning, cache allocation
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def agreement(a: torch.Tensor, b: torch.Tensor, prompt_len: int) -> float:
    """Share of generated tokens equal up to each request's first difference."""
    ga, gb = a[:, prompt_len:], b[:, prompt_len:]
    same = (ga == gb).int().cumprod(dim=1)
    return float(same.sum()) / same.numel()


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    modes = [m for m in args.modes if m != "compiled" or device.type == "cuda"]
    result = {"benchmark": "generate", "env": environment(), "device": str(device), "dtype": str(dtype),
              "args": {k: v for k, v in vars(args).items() if k != "json"}, "rows": []}
    gen = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(1, args.vocab, (b, args.prompt), generator=gen).to(device) for b in args.batches}
    for name in args.models:
        model = build(name, args, dtype, device)
        ref = {}
        for mode in modes:
            for b in args.batches:
                x = prompts[b]
                out = generate(model, x, args.new, mode)
                if mode == "dynamic" and b == args.batches[0]:
                    ref[b] = out
                agree = agreement(out, ref[b], args.prompt) if b in ref else None
                t_gen = timed(lambda: generate(model, x, args.new, mode), args.reps, device)
                t_pre = timed(lambda: generate(model, x, 1, mode), args.reps, device)
                row = {"model": name, "mode": mode, "batch": b, "prompt": args.prompt, "new": args.new,
                       "active_ffn_params": active_ffn_params(name, args),
                       "tokens_per_s": b * args.new / t_gen, "generate_s": t_gen, "prefill_s": t_pre,
                       "decode_step_ms": 1e3 * max(0.0, t_gen - t_pre) / (args.new - 1),
                       "agree_with_dynamic": agree,
                       "peak_GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
                result["rows"].append(row)
                print(f"{name:9s} {mode:8s} B={b:3d}  {row['tokens_per_s']:10.1f} tok/s  "
                      f"decode step {row['decode_step_ms']:8.2f} ms  prefill {1e3 * t_pre:8.1f} ms"
                      + ("" if agree is None else f"  agree {agree:.3f}"), flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(result, f, indent=1)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    return result


def print_table(result) -> None:
    rows = result["rows"]
    dense = {(r["mode"], r["batch"]): r["tokens_per_s"] for r in rows if r["model"] == "dense"}
    print(f"\ngreedy generate(), {result['env'].get('gpu') or 'CPU'}, {result['dtype']}, "
          f"prompt {rows[0]['prompt'] if rows else '-'}, new {rows[0]['new'] if rows else '-'}")
    print("| model | mode | batch | active FFN params | tokens/s | vs dense | decode step ms | prefill ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        d = dense.get((r["mode"], r["batch"]))
        ratio = "-" if d is None else f"{r['tokens_per_s'] / d:.2f}"
        print(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['active_ffn_params']:,} | "
              f"{r['tokens_per_s']:,.1f} | {ratio} | {r['decode_step_ms']:.2f} | {1e3 * r['prefill_s']:.1f} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("generate.py: error: needs transformers (pip install -e '.[hf]')", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except UsageError as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    print_table(result)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
