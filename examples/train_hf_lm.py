#!/usr/bin/env python
"""Train a small OmniMoEForCausalLM (a Llama-style decoder whose MLPs are OmniMoE
layers) on a local text file, byte by byte, with a plain PyTorch loop.

The default text ships with the repository (examples/data/lighthouse.txt); any UTF-8
file works.  Bytes are the tokens (vocabulary 256), so no tokenizer is needed.  The last
10% of the text is held out for validation.  Progress lines report the training and
validation loss and how many of the E experts the batch used (layer 0).

    python examples/train_hf_lm.py --steps 300 --device cuda --plot hf_loss.png --save out/
    OMP_NUM_THREADS=1 python examples/train_hf_lm.py --steps 40 --hidden 64 --layers 2   # a small CPU run
    torchrun --nproc-per-node 2 examples/train_hf_lm.py --parallel ddp   # or fsdp

With ``--parallel`` (under torchrun, one process per GPU, or gloo on CPU) every process
draws the same global batch of ``--batch`` sequences and trains on its share: DDP
(``omni_moe.distributed.data_parallel``) or FSDP2 on every decoder layer and the model
(``fully_shard_model``, float32 parameters).  The router statistics are synchronised
across the processes, so with ``--aux-coef 0`` the losses are those of one process on
the whole batch; the load-balancing loss, like Mixtral's, is computed on each process's
own tokens.  Rank 0 prints and writes.

Needs ``pip install 'omni-moe[hf]'`` (transformers); ``--plot`` needs matplotlib.  The
saved directory loads back with ``AutoModelForCausalLM.from_pretrained`` after
``import omni_moe.hf``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TEXT = os.path.join(HERE, "data", "lighthouse.txt")

try:
    import omni_moe  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(HERE, ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", default=DEFAULT_TEXT, help="UTF-8 text file (default: the shipped one)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128, help="tokens (bytes) per sequence")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=None, help="shared-MLP width (default 2*hidden)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=1024, help="E, a perfect square")
    p.add_argument("--k", type=int, default=16, help="experts per token")
    p.add_argument("--router-norm", default="layernorm", help="layernorm, batchnorm or none")
    p.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss weight")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="save a loss plot here (needs matplotlib)")
    p.add_argument("--save", default=None, help="save_pretrained the trained model into this directory")
    p.add_argument("--sample", type=int, default=120, help="bytes to generate at the end (0: none)")
    p.add_argument("--json", default=None, help="write the logged losses here")
    p.add_argument("--parallel", choices=("none", "ddp", "fsdp"), default="none",
                   help="data parallel over the processes of torchrun (docs/distributed.md)")
    return p.parse_args(argv)


def start_processes(args):
    """(rank, world): the process group of a torchrun launch for --parallel, else (0, 1)."""
    if args.parallel == "none":
        return 0, 1
    import torch.distributed as dist

    if "LOCAL_RANK" not in os.environ:
        raise ValueError("--parallel needs a torchrun launch: "
                         "torchrun --nproc-per-node 2 examples/train_hf_lm.py --parallel ddp")
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if args.batch % dist.get_world_size():
        raise ValueError(f"--batch {args.batch} must be a multiple of the {dist.get_world_size()} processes")
    return dist.get_rank(), dist.get_world_size()


def global_mean(value: float, world: int, device) -> float:
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world


def load_bytes(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
    return data


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    starts = torch.randint(0, data.numel() - seq, (batch,), generator=gen)
    return torch.stack([data[s:s + seq] for s in starts.tolist()])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import omni_moe.hf as ohf
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        for name in ("steps", "batch", "seq", "hidden", "layers", "heads", "log_every"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.hidden % args.heads:
            raise ValueError(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
        data = load_bytes(args.text)
        if data.numel() < 10 * (args.seq + 1):
            raise ValueError(f"--text: {args.text} has {data.numel()} bytes; need >= {10 * (args.seq + 1)} "
                             "for --seq (lower --seq)")
        config = ohf.OmniMoELMConfig(
            vocab_size=256, hidden_size=args.hidden,
            intermediate_size=args.intermediate or 2 * args.hidden,
            num_hidden_layers=args.layers, num_attention_heads=args.heads,
            max_position_embeddings=args.seq, num_experts=args.experts,
            num_experts_per_tok=args.k, router_norm=args.router_norm,
            router_aux_loss_coef=args.aux_coef, bos_token_id=None, eos_token_id=None,
            tie_word_embeddings=True)
        rank, world = start_processes(args)
        device = torch.device(args.device)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        return train(args, ohf, config, data, device, rank, world)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def train(args, ohf, config, data, device, rank, world) -> int:
    say = print if rank == 0 else (lambda *a, **k: None)
    if rank == 0:
        from omni_moe.bench.common import report_threads

        report_threads("train_hf_lm.py", processes=world)

    torch.manual_seed(args.seed)
    split = int(data.numel() * 0.9)
    train, val = data[:split], data[split:]
    model = ohf.OmniMoEForCausalLM(config).to(device)
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    net = model   # what the steps call: the model, or its DDP / FSDP2 wrapping
    if args.parallel == "ddp":
        from omni_moe.distributed import data_parallel

        net = data_parallel(model)
    elif args.parallel == "fsdp":
        from omni_moe.distributed import fully_shard_model

        net = fully_shard_model(model, param_dtype=None, blocks=list(model.model.layers))
    say(f"OmniMoEForCausalLM: {n_params / 1e6:.2f}M parameters, {args.layers} layers, "
          f"E={args.experts}, k={args.k}, router_norm={args.router_norm}; "
          f"text {data.numel()} bytes ({args.text})", flush=True)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(args.seed + 1)
    val_gen = torch.Generator().manual_seed(args.seed + 2)
    val_batch = batches(val, args.batch, min(args.seq, val.numel() - 1), val_gen).to(device)

    history = {"step": [], "train": [], "val": []}
    t0, tokens = time.perf_counter(), 0
    share = args.batch // world
    for step in range(1, args.steps + 1):
        net.train()
        x = batches(train, args.batch, args.seq, gen)[rank * share:(rank + 1) * share].to(device)
        out = net(x, labels=x, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += x.numel() * world
        if step % args.log_every == 0 or step == args.steps:
            usage = ohf.expert_usage(out.router_logits[:1], args.k)
            net.eval()
            with torch.no_grad():
                vloss = net(val_batch, labels=val_batch).loss.item()
            aux = global_mean(out.aux_loss.item(), world, device)
            lm = global_mean(out.loss.item(), world, device) - args.aux_coef * aux
            rate = tokens / (time.perf_counter() - t0)
            history["step"].append(step)
            history["train"].append(lm)
            history["val"].append(vloss)
            say(f"step {step:5d}  train {lm:.3f}  val {vloss:.3f}  aux {aux:.3f}  "
                f"experts used (layer 0{', rank 0' if world > 1 else ''}) "
                f"{usage.touched[0]}/{usage.num_experts}  {rate:,.0f} tok/s", flush=True)

    if args.sample:
        # every process generates (FSDP2 gathers the parameters for each forward)
        model.eval()
        prompt = torch.tensor([list(b"The keeper ")], device=device)
        with torch.no_grad():
            outp = model.generate(prompt, max_new_tokens=args.sample, do_sample=False)
        text = bytes(outp[0].tolist()).decode("utf-8", errors="replace")
        say(f"sample: {text!r}")
    if args.save:
        plain = model
        if args.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # every process takes part; rank 0 receives the whole tensors, in an unsharded copy
            state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                plain = ohf.OmniMoEForCausalLM(config).to(next(iter(state.values())).dtype)
                plain.load_state_dict(state)
        if rank == 0:
            plain.save_pretrained(args.save)
            print(f"saved to {args.save}")
    if rank:
        return 0
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "params": n_params, **history}, f, indent=1)
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("--plot: matplotlib is not installed; no plot", file=sys.stderr)
        else:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(history["step"], history["train"], label="train")
            ax.plot(history["step"], history["val"], label="validation")
            ax.set_xlabel("step")
            ax.set_ylabel("loss (nats / byte)")
            ax.set_title(f"OmniMoEForCausalLM, E={args.experts}, k={args.k}")
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.plot, dpi=120)
            print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
