#!/usr/bin/env python
"""Train a tiny decoder-only LM whose FFN blocks are OmniMoE layers, beside a dense
SwiGLU baseline with the same number of ACTIVE parameters per token.

Data is generated here, no download: a random sparse second-order Markov chain over a
small vocabulary (a "synthetic grammar").  The previous token narrows the next one to
``--fanout`` candidates, the previous two to ``--branch`` of them with random
probabilities; the best possible loss is the chain's conditional entropy, printed as the
floor.  Learning it means memorising
``vocab^2`` context -> successor tables: a job for a large memory of atomic experts.

    python examples/train_tiny_lm.py --steps 300 --device cuda --plot loss.png --json run.json
    OMP_NUM_THREADS=1 python examples/train_tiny_lm.py --quick   # CPU-sized (times: QUICK below)

CUDA runs the Triton kernels; ``--device cpu`` runs the PyTorch paths (add
TRITON_INTERPRET=1 to push CPU tensors through the kernels, slowly).  A progress bar comes
from tqdm when it is installed; ``--plot`` needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import omni_moe  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from omni_moe import OmniMoE, OmniMoEConfig
from omni_moe.bench.common import report_threads
from omni_moe.ops import swiglu_mlp


# ----------------------------------------------------------------------------- data
class MarkovGrammar:
    """Sparse order-2 Markov chain: next token ~ P(. | previous two tokens a, b).

    Two levels, so a model makes progress at once and keeps finding more to learn: the
    previous token b alone narrows the next one to a set S(b) of ``fanout`` tokens (a
    bigram model reaches about log(fanout)); the pair (a, b) then allows only ``branch``
    of them, with random probabilities (the floor is the mean entropy of those).
    """

    def __init__(self, vocab: int, fanout: int, branch: int, seed: int):
        if not 1 <= branch <= fanout <= vocab:
            raise ValueError(f"need 1 <= branch <= fanout <= vocab, got {branch}, {fanout}, {vocab}")
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        V = vocab
        follow = torch.rand(V, V, generator=g).argsort(dim=1)[:, :fanout]        # S(b)
        pick = torch.rand(V * V, fanout, generator=g).argsort(dim=1)[:, :branch]
        b_of_ctx = torch.arange(V * V) % V
        self.succ = follow[b_of_ctx].gather(1, pick)                               # (V*V, branch)
        # probabilities: a Dirichlet(1) draw (normalised exponentials)
        p = -torch.log(torch.rand(V * V, branch, generator=g))
        self.prob = p / p.sum(dim=1, keepdim=True)
        self.gen = g

    def sample(self, batch: int, length: int):
        """(tokens (batch, length), -log p_true of tokens 2.. (batch, length - 2))."""
        V = self.vocab
        toks = torch.empty(batch, length, dtype=torch.long)
        toks[:, :2] = torch.randint(0, V, (batch, 2), generator=self.gen)
        nll = torch.empty(batch, length - 2)
        for t in range(2, length):
            c = toks[:, t - 2] * V + toks[:, t - 1]
            p = self.prob[c]
            r = torch.multinomial(p, 1, generator=self.gen).squeeze(1)
            toks[:, t] = self.succ[c, r]
            nll[:, t - 2] = -torch.log(p.gather(1, r[:, None]).squeeze(1))
        return toks, nll


# ----------------------------------------------------------------------------- model
class DenseFFN(nn.Module):
    """SwiGLU MLP (the same fused activation the OmniMoE layer's shared branch uses)."""

    def __init__(self, d: int, inner: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(d, inner, bias=False)
        self.up_proj = nn.Linear(d, inner, bias=False)
        self.down_proj = nn.Linear(inner, d, bias=False)
        self.act = act

    def forward(self, x):
        return swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.act)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: nn.Module):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = ffn

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, D))
        return x + self.ffn(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq_len: int, make_ffn):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq_len, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, make_ffn()) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return F.linear(self.ln_f(x), self.embed.weight)  # tied output head


def count_params(model: nn.Module):
    """(total, active per token): an OmniMoE layer activates its shared MLP, its router
    gates and k of its E atomic experts (2*H parameters each)."""
    total = sum(p.numel() for p in model.parameters())
    active = total
    for m in model.modules():
        if isinstance(m, OmniMoE):
            active -= m.up_embed.weight.numel() + m.down_embed.weight.numel()
            active += 2 * m.top_k * m.hidden_size
    return total, active


# ----------------------------------------------------------------------------- progress
class _Bar:
    """tqdm when installed, else a one-line bar on stderr."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=total, desc=desc, dynamic_ncols=True)
        except ImportError:
            self._tqdm = None
        self.total, self.n, self.desc, self.post = total, 0, desc, ""
        self._last = 0.0

    def update(self, n: int, postfix: str):
        self.n += n
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(postfix, refresh=False)
            self._tqdm.update(n)
            return
        now = time.monotonic()
        if now - self._last < 0.2 and self.n < self.total:
            return
        self._last = now
        width = 30
        fill = int(width * self.n / max(1, self.total))
        sys.stderr.write(f"\r{self.desc} [{'#' * fill}{'.' * (width - fill)}] {self.n}/{self.total} {postfix}")
        sys.stderr.flush()

    def write(self, line: str):
        """Print a line to stdout without breaking the bar."""
        if self._tqdm is not None:
            self._tqdm.write(line)
            return
        if self.n:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._last = 0.0  # redraw the bar on the next update
        print(line, flush=True)

    def close(self):
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ----------------------------------------------------------------------------- training
# Experiment sizes.  The defaults are GPU-sized: 200 steps took 4.3 s (OmniMoE) and 1.4 s
# (dense) of training on one H100 (docs/train_tiny_lm.json, 2026-11-26); not timed on CPU.
# --quick is the same experiment at a CPU size: measured 2026-12-07 on a 2-core Xeon VM
# shared with other jobs (load ~8.7), 11 s with OMP_NUM_THREADS=1 and 61 s with torch's
# default 2 threads (docs/benchmarks.md, "CPU runs").  Options given explicitly win over --quick.
QUICK = dict(steps=60, seq_len=32, batch_size=8, d_model=32, layers=1, heads=2,
             intermediate=64, experts=64, topk=4, lr=1e-2, warmup=5, eval_every=20,
             eval_batches=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def q(dest, text):
        return f"{text} (--quick: {QUICK[dest]})"

    p.add_argument("--quick", action="store_true",
                   help="CPU-sized run: the --quick values below replace the defaults of "
                        "options not given")
    p.add_argument("--steps", type=int, default=300, help=q("steps", "training steps"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (Triton kernels) or cpu (PyTorch paths)")
    p.add_argument("--plot", metavar="PATH", help="write both loss curves to this PNG (needs matplotlib)")
    p.add_argument("--json", metavar="PATH", help="write losses and settings to this JSON file")
    p.add_argument("--seed", type=int, default=0, help="seed of the grammar, the data and the models")
    p.add_argument("--parallel", choices=("none", "ddp", "fsdp"), default="none",
                   help="data parallel over the processes of torchrun (see docs/distributed.md); "
                        "--batch-size is the global batch")
    p.add_argument("--vocab", type=int, default=64, help="vocabulary size")
    p.add_argument("--fanout", type=int, default=8, help="successors of each previous token")
    p.add_argument("--branch", type=int, default=2, help="successors of each (a, b) context")
    p.add_argument("--seq-len", type=int, default=128, help=q("seq_len", "tokens per sequence"))
    p.add_argument("--batch-size", type=int, default=32, help=q("batch_size", "sequences per step"))
    p.add_argument("--d-model", type=int, default=128, help=q("d_model", "model width H"))
    p.add_argument("--layers", type=int, default=2, help=q("layers", "transformer blocks"))
    p.add_argument("--heads", type=int, default=4, help=q("heads", "attention heads"))
    p.add_argument("--intermediate", type=int, default=256,
                   help=q("intermediate", "OmniMoE shared-MLP width"))
    p.add_argument("--experts", type=int, default=4096,
                   help=q("experts", "atomic experts (a perfect square)"))
    p.add_argument("--topk", type=int, default=16, help=q("topk", "experts per token"))
    p.add_argument("--act", default="silu", choices=("silu", "gelu", "relu"), help="activation")
    p.add_argument("--lr", type=float, default=3e-3, help=q("lr", "peak learning rate (AdamW)"))
    p.add_argument("--warmup", type=int, default=30, help=q("warmup", "linear warm-up steps"))
    p.add_argument("--eval-every", type=int, default=50,
                   help=q("eval_every", "steps between held-out evaluations (and the last step)"))
    p.add_argument("--eval-batches", type=int, default=4,
                   help=q("eval_batches", "held-out batches per evaluation"))
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.quick:
        # A second parse with None defaults tells which options were given explicitly.
        probe = build_parser()
        probe.set_defaults(**{k: None for k in QUICK})
        given = vars(probe.parse_args(argv))
        for k, v in QUICK.items():
            if given[k] is None:
                setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    par = Parallel(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    if par.rank == 0:
        report_threads("train_tiny_lm.py", processes=par.world)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    d = args.d_model
    moe_cfg = OmniMoEConfig(hidden_size=d, intermediate_size=args.intermediate, hidden_act=args.act,
                            num_experts=args.experts, num_experts_per_token=args.topk)
    N = moe_cfg.num_expert_sqrt
    # equal active parameters: 3*d*I_dense = 3*d*I + 2*N*d (router) + 2*k*d (experts)
    dense_inner = args.intermediate + round((2 * N + 2 * args.topk) / 3)

    models = {
        "omni_moe": TinyLM(args.vocab, d, args.layers, args.heads, args.seq_len, lambda: OmniMoE(moe_cfg)),
        "dense": TinyLM(args.vocab, d, args.layers, args.heads, args.seq_len,
                        lambda: DenseFFN(d, dense_inner, args.act)),
    }
    grammar = MarkovGrammar(args.vocab, args.fanout, args.branch, args.seed + 1)
    val_tokens, val_nll = grammar.sample(args.eval_batches * args.batch_size, args.seq_len + 1)
    floor = float(val_nll.mean())

    info = {}
    opts = {}
    for name, m in models.items():
        m.to(device)
        m = models[name] = par.wrap(m)
        total, active = count_params(m)
        info[name] = {"params_total": total, "params_active": active}
        opts[name] = torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path = "Triton kernels" if device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") \
        else "PyTorch path"
    print(f"device: {dev_name} ({path}); data: order-2 Markov grammar, vocab {args.vocab}, "
          f"{args.fanout} successors per token, {args.branch} per pair; loss floor (true entropy) {floor:.3f} nats")
    print(f"OmniMoE FFN: H={d}, shared I={args.intermediate}, E={args.experts} ({N}^2), k={args.topk}; "
          f"dense FFN: I={dense_inner}")
    for name in models:
        print(f"  {name:9s} params: {info[name]['params_total']:,} total, {info[name]['params_active']:,} active/token")

    def lr_at(step):
        return args.lr * min(1.0, (step + 1) / max(1, args.warmup))

    @torch.no_grad()
    def evaluate(m):
        m.eval()
        losses = []
        for i in range(args.eval_batches):
            b = val_tokens[i * args.batch_size:(i + 1) * args.batch_size].to(device)
            logits = m(b[:, :-1])
            # positions 0 and 1 have no full context; the floor covers targets 2.. onwards
            losses.append(float(F.cross_entropy(logits[:, 1:].reshape(-1, args.vocab).float(),
                                                b[:, 2:].reshape(-1))))
        m.train()
        return sum(losses) / len(losses)

    history = {name: {"loss": [], "eval": [], "time_s": 0.0} for name in models}
    bar = _Bar(args.steps, "train")
    for step in range(args.steps):
        tokens, _ = grammar.sample(args.batch_size, args.seq_len + 1)
        tokens = par.shard(tokens.to(device))
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        post = []
        for name, m in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for g in opts[name].param_groups:
                g["lr"] = lr_at(step)
            logits = m(inp)
            loss = F.cross_entropy(logits[:, 1:].reshape(-1, args.vocab).float(), tgt[:, 1:].reshape(-1))
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            lv = par.mean(float(loss.detach()))  # synchronises
            history[name]["time_s"] += time.perf_counter() - t0
            history[name]["loss"].append(lv)
            post.append(f"{name}={lv:.3f}")
            if not math.isfinite(lv):
                bar.close()
                print(f"{name}: loss is {lv} at step {step}", file=sys.stderr)
                return 1
        bar.update(1, " ".join(post))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            for name, m in models.items():
                history[name]["eval"].append((step + 1, evaluate(m)))
            bar.write(f"step {step + 1}: eval loss " + "  ".join(
                f"{name} {history[name]['eval'][-1][1]:.3f}" for name in models)
                + f"  (floor {floor:.3f})")
    bar.close()

    tokens_per_step = args.batch_size * args.seq_len
    print(f"after {args.steps} steps (floor {floor:.3f}):")
    for name in models:
        h = history[name]
        ev = h["eval"][-1][1] if h["eval"] else float("nan")
        tps = tokens_per_step * args.steps / max(h["time_s"], 1e-9)
        print(f"  {name:9s} train loss {h['loss'][-1]:.3f}  eval loss {ev:.3f}  "
              f"({tps:,.0f} tokens/s incl. optimizer)")

    result = {
        "args": vars(args), "device": dev_name, "path": path, "loss_floor": floor,
        "dense_intermediate": dense_inner, "tokens_per_step": tokens_per_step,
        "models": {name: {**info[name], **history[name]} for name in models},
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        curves = [("omni_moe", f"OmniMoE (E={args.experts}, k={args.topk})", (31, 119, 180)),
                  ("dense", f"dense SwiGLU (I={dense_inner})", (255, 127, 14))]
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            _plot_without_matplotlib(args.plot, [(history[n]["loss"], c) for n, _, c in curves], floor)
            print(f"wrote {args.plot} (matplotlib not installed: bare curves, no labels; "
                  f"blue = OmniMoE, orange = dense, gray = floor)")
        else:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for name, label, color in curves:
                h = history[name]
                rgb = tuple(c / 255 for c in color)
                ax.plot(range(1, len(h["loss"]) + 1), h["loss"], color=rgb, alpha=0.6, label=f"{label} train")
                if h["eval"]:
                    xs, ys = zip(*h["eval"])
                    ax.plot(xs, ys, "o--", color=rgb, label=f"{label} eval")
            ax.axhline(floor, color="gray", ls=":", label=f"floor (entropy) {floor:.3f}")
            ax.set_xlabel("step")
            ax.set_ylabel("cross-entropy (nats)")
            ax.set_title(f"tiny LM, equal active parameters ({dev_name})")
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.plot, dpi=120)
            print(f"wrote {args.plot}")
    return 0


class Parallel:
    """``--parallel ddp|fsdp`` under torchrun: one process per device, each training on
    its rows of the same global batch (the router statistics synchronised across ranks),
    DDP or FSDP2 (``omni_moe.distributed``) on both models; rank 0 prints and writes."""

    def __init__(self, args):
        self.on = args.parallel != "none"
        self.kind, self.rank, self.world = args.parallel, 0, 1
        if not self.on:
            return
        import atexit

        import torch.distributed as dist

        if "LOCAL_RANK" not in os.environ:
            print("--parallel needs a torchrun launch: torchrun --nproc-per-node 2 "
                  "examples/train_tiny_lm.py --parallel ddp", file=sys.stderr)
            sys.exit(2)
        local = int(os.environ["LOCAL_RANK"])
        if args.device.startswith("cuda"):
            args.device = f"cuda:{local}"
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        atexit.register(dist.destroy_process_group)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if args.batch_size % self.world:
            print(f"--batch-size {args.batch_size} must be a multiple of the {self.world} processes",
                  file=sys.stderr)
            sys.exit(2)
        if self.rank:
            args.json = args.plot = None
            sys.stdout = open(os.devnull, "w")
            globals()["_Bar"] = _QuietBar

    def wrap(self, model):
        if self.kind == "ddp":
            from omni_moe.distributed import data_parallel

            return data_parallel(model)
        if self.kind == "fsdp":
            from omni_moe.distributed import fully_shard_model

            return fully_shard_model(model, param_dtype=None, blocks=list(model.blocks))
        return model

    def shard(self, batch):
        n = batch.shape[0] // self.world
        return batch[self.rank * n:(self.rank + 1) * n]

    def mean(self, value: float) -> float:
        if not self.on:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return float(t) / self.world


class _QuietBar:
    """The progress bar of ranks other than 0: prints nothing."""

    def __init__(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass

    def write(self, *a, **k):
        pass

    def close(self):
        pass


def _plot_without_matplotlib(path, series, floor, width=800, height=500):
    """A bare PNG of the loss curves (no text) for machines without matplotlib."""
    import struct
    import zlib

    img = [[(255, 255, 255)] * width for _ in range(height)]
    ys = [v for vals, _ in series for v in vals if math.isfinite(v)] + [floor]
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1.0
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.02 * (hi - lo)
    n = max(len(vals) for vals, _ in series)
    m = 40  # margin

    def px(i, v):
        x = m + int((width - 2 * m) * i / max(1, n - 1))
        y = height - m - int((height - 2 * m) * (v - lo) / (hi - lo))
        return x, y

    def dot(x, y, c):
        for dx in (0, 1):
            for dy in (0, 1):
                if 0 <= x + dx < width and 0 <= y + dy < height:
                    img[y + dy][x + dx] = c

    def line(p, q, c):
        steps = max(abs(q[0] - p[0]), abs(q[1] - p[1]), 1)
        for s in range(steps + 1):
            dot(p[0] + (q[0] - p[0]) * s // steps, p[1] + (q[1] - p[1]) * s // steps, c)

    gray = (160, 160, 160)
    line((m, height - m), (width - m, height - m), gray)
    line((m, m), (m, height - m), gray)
    fy = px(0, floor)[1]
    for x in range(m, width - m, 8):
        line((x, fy), (min(x + 4, width - m), fy), gray)
    for vals, color in series:
        pts = [px(i, v) for i, v in enumerate(vals) if math.isfinite(v)]
        for p, q in zip(pts, pts[1:]):
            line(p, q, color)
    raw = b"".join(b"\x00" + bytes(c for rgb in row for c in rgb) for row in img)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


if __name__ == "__main__":
    sys.exit(main())
