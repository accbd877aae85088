#!/usr/bin/env python
"""Convert a dense Llama-, Qwen2-, Mistral- or Qwen3-style causal LM into an OmniMoE model,
check that its outputs did not change, save it, and load it back with the Auto classes.

    python examples/convert_llama.py --model-dir /path/to/llama --out converted/ \\
        --num-experts 4096 --k 16 --layers 0,2,4
    python examples/convert_llama.py --out /tmp/omni-tiny      # a tiny random Llama built here

``--model-dir`` is a local directory (``save_pretrained`` output); nothing is downloaded.
Without it the script builds a tiny random LlamaForCausalLM.  The comparison runs the
model on random token ids before and after the conversion; the converted model starts
with zero expert output tables, so the logits are equal.  Needs ``pip install
'omni-moe[hf]'``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import omni_moe  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(HERE, ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=None, help="local model directory (default: a tiny random Llama)")
    p.add_argument("--out", required=True, help="directory to save the converted model into")
    p.add_argument("--num-experts", type=int, default=1024, help="E, a perfect square")
    p.add_argument("--k", type=int, default=16, help="experts per token")
    p.add_argument("--layers", default=None, help="comma-separated decoder layers (default: all)")
    p.add_argument("--router-norm", default="layernorm", help="layernorm, batchnorm or none")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import omni_moe.hf as ohf
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    try:
        layers = None if args.layers is None else [int(s) for s in args.layers.split(",") if s.strip()]
        if args.model_dir is None:
            config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
            model = LlamaForCausalLM(config).to(dtype)
            source = "a tiny random Llama"
        else:
            if not os.path.isdir(args.model_dir):
                raise ValueError(f"--model-dir: {args.model_dir} is not a directory")
            model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
            source = args.model_dir
        model.eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        with torch.no_grad():
            before = model(ids).logits
        ohf.apply_omnimoe(model, layers=layers, num_experts=args.num_experts,
                          num_experts_per_tok=args.k, router_norm=args.router_norm)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    from omni_moe.bench.common import report_threads

    report_threads("convert_llama.py")
    with torch.no_grad():
        after = model(ids).logits
    diff = (after.float() - before.float()).abs().max().item()
    n_moe = sum(isinstance(layer.mlp, ohf.OmniMoEBlock) for layer in model.model.layers)
    print(f"converted {source}: {n_moe}/{len(model.model.layers)} MLPs are OmniMoE layers "
          f"(E={args.num_experts}, k={args.k}, router_norm={args.router_norm}); "
          f"max |logits after - before| = {diff:.3g}")
    model.save_pretrained(args.out)
    loaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=dtype).eval()
    with torch.no_grad():
        again = loaded(ids).logits
    same = torch.equal(again, after)
    print(f"saved to {args.out} (model_type {loaded.config.model_type!r}, {type(loaded).__name__}); "
          f"reloaded logits identical: {same}")
    return 0 if diff == 0 and same else 1


if __name__ == "__main__":
    sys.exit(main())
