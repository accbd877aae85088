#!/usr/bin/env python
"""Does an OmniMoE layer make a better language model at equal active parameters?

Trains byte-level decoder LMs that differ only in their FFN -- same Llama trunk (depth,
width, attention, RMSNorm, rotary embeddings), same tokens, same optimizer and learning
rate schedule, same budget -- and reports validation bits per byte (bpb), tokens/s and
peak memory.  docs/quality.md explains the design and how to read the output.

    python benchmarks/lm_quality.py --json q.json --plot q.png         # GPU, every arm
    python benchmarks/lm_quality.py --arms dense,omnimoe --seeds 0 --json a.json
    python benchmarks/lm_quality.py --from-json a.json b.json --json all.json --plot q.png
    python benchmarks/lm_quality.py --tiny --json /tmp/q.json          # CPU smoke run

Corpus: the ``.py`` files of the running Python's standard library (``sysconfig``'s
stdlib path, without site-packages), plus any ``--corpus DIR`` trees.  A file belongs to
the validation split when the first 8 bytes of the SHA-256 of its path relative to its
tree, read as a big-endian integer, are below ``--val-frac`` of 2**64 -- the same split on
every machine.  Tokens are bytes (0..255) and one separator (256) before each file.

Arms (``--arms``, comma-separated; each ``NAME[:key=value]...``):

    dense     Llama SwiGLU MLP of width --dense-width (I_dense)
    omnimoe   OmniMoEForCausalLM: shared SwiGLU of width I_shared plus K of E atomic
              experts; K chosen so that 3*H*I_shared + 2*N*H + 2*H*K = 3*H*I_dense
              (shared MLP + router + active experts = the dense MLP)
    peer      PEER-style layer (multi-head product-key retrieval of single-neuron
              experts, no shared MLP) with the active and total FFN parameters of the
              default omnimoe arm
    moe       token-choice top-k SwiGLU experts with a load-balancing loss (Mixtral /
              Qwen-MoE style), active and total FFN parameters of the default omnimoe arm

Keys (any arm: ``lr`` peak learning rate, ``seeds`` how many of --seeds it runs):

    omnimoe   experts=E (a perfect square), k=K, shared=I_shared (0: no shared MLP),
              router_norm=layernorm|batchnorm|none, weights=exp|softmax (exp of the
              joint log-probability, as the layer computes; or a softmax over the K
              selected scores), aux=COEF (load-balancing loss), table_lr=MULT (expert
              tables' learning rate, times lr), table_init=MULT (their init std, times
              the default)
    peer      experts=E, k=K per head, heads=h, key_dim=d, table_lr, table_init
    moe       experts=n, k=top-k, width=I_expert, aux

Sizes not given are chosen to match the active (and for peer/moe total) FFN parameters
within ``MATCH_TOL``; an arm whose sizes are all given runs as given and is marked
unmatched when it misses.  ``omnimoe:k=128`` re-derives I_shared, ``omnimoe:shared=0``
re-derives K.  ``dense`` and ``omnimoe`` run on every --seeds by default, others on the
first one.

Budget per arm: ``--tokens`` and/or ``--budget-s`` (training seconds, evaluations and
the first, compiling step not counted); an arm stops at whichever comes first, and the
schedule (linear warm-up over --warmup-steps, constant, linear decay to zero over the
last --decay fraction of the budget) follows the same progress.  Needs transformers
(``pip install 'omni-moe[hf]'``); --plot needs matplotlib.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import statistics
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's omni_moe, installed or not

from omni_moe import OmniMoE, omni_expert, omni_router  # noqa: E402
from omni_moe.bench import common  # noqa: E402
from omni_moe.bench.common import UsageError  # noqa: E402
from omni_moe.optim import expert_parameters  # noqa: E402

SEP = 256                # the token before every file's bytes
VOCAB = 257
MATCH_TOL = 0.01         # relative: FFN active params vs dense, FFN total vs omnimoe
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
BASES = ("dense", "omnimoe", "peer", "moe")


# ----------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Sizes:
    """What every arm shares, plus the reference omnimoe (E, I_shared) that the peer and
    moe arms match, and the peer/moe shape preferences their sizes are solved around."""

    hidden: int = 512
    layers: int = 8
    heads: int = 8
    seq: int = 512
    batch: int = 32
    dense_width: int = 1536
    shared_width: int = 1280
    experts: int = 16384
    peer_heads: int = 8
    peer_key_dim: int = 128
    moe_k: int = 8


# Toy sizes for a CPU smoke run: every arm in seconds.
TINY = Sizes(hidden=64, layers=2, heads=4, seq=64, batch=8, dense_width=192, shared_width=160,
             experts=576, peer_heads=4, peer_key_dim=80, moe_k=6)


@dataclass(frozen=True)
class TrainConfig:
    tokens: int | None = None        # token budget per arm
    budget_s: float | None = 200.0   # training-time budget per arm
    lr: float = 2e-3
    warmup_steps: int = 100
    decay: float = 0.2               # fraction of the budget over which lr decays to 0
    weight_decay: float = 0.0
    clip: float = 1.0
    evals: int = 8                   # validation points on the curve
    val_tokens: int = 2**18
    precision: str = "amp"           # amp (bf16 autocast, fp32 weights) | bf16 | fp32


@dataclass(frozen=True)
class Plan:
    """One arm, resolved: its FFN sizes and training options."""

    label: str
    base: str
    ffn: tuple            # sorted (key, value) pairs
    lr: float
    seeds: int
    enforce_match: bool   # sizes were chosen by the matching rule

    def get(self, key, default=None):
        return dict(self.ffn).get(key, default)


# ----------------------------------------------------------------------------- corpus
def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_files(roots, suffixes=(".py",)) -> list[tuple[str, str]]:
    """(root, path relative to root, '/'-separated) of every file with one of
    ``suffixes`` under ``roots``, sorted; site-packages, __pycache__ and hidden
    directories skipped; a file reached twice (overlapping roots) listed once."""
    out, seen = [], set()
    for root in roots:
        found = []
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not x.startswith(".")]
            for f in files:
                if f.endswith(tuple(suffixes)):
                    full = os.path.join(d, f)
                    real = os.path.realpath(full)
                    if real not in seen:
                        seen.add(real)
                        found.append((root, os.path.relpath(full, root).replace(os.sep, "/")))
        out.extend(sorted(found, key=lambda rf: rf[1]))
    return out


def is_validation(relpath: str, val_frac: float) -> bool:
    """The split rule: a fixed hash of the relative path, so every machine and every run
    puts the same files on the same side."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return h < val_frac * 2.0**64


def split_files(files, val_frac: float):
    train = [f for f in files if not is_validation(f[1], val_frac)]
    val = [f for f in files if is_validation(f[1], val_frac)]
    return train, val


def _token_stream(files) -> tuple[torch.Tensor, int]:
    """(int16 tokens: SEP then the bytes, for every readable file; bytes read)."""
    import numpy as np

    parts, nbytes = [], 0
    for root, rel in files:
        try:
            with open(os.path.join(root, rel), "rb") as f:
                data = f.read()
        except OSError:
            continue
        parts.append(np.array([SEP], dtype=np.int16))
        parts.append(np.frombuffer(data, dtype=np.uint8).astype(np.int16))
        nbytes += len(data)
    arr = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)
    return torch.from_numpy(arr), nbytes


@dataclass
class Corpus:
    train: torch.Tensor
    val: torch.Tensor
    info: dict


def load_corpus(extra_roots=(), suffixes=(".py",), val_frac: float = 0.05) -> Corpus:
    roots = [stdlib_root(), *extra_roots]
    for r in roots[1:]:
        if not os.path.isdir(r):
            raise UsageError(f"--corpus {r}: not a directory")
    files = list_files(roots, suffixes)
    train_files, val_files = split_files(files, val_frac)
    train, train_bytes = _token_stream(train_files)
    val, val_bytes = _token_stream(val_files)
    if not train_files or not val_files:
        raise UsageError(f"the corpus has {len(train_files)} training and {len(val_files)} "
                         "validation files; need both (add --corpus trees or change --val-frac)")
    info = {"roots": roots, "suffixes": list(suffixes), "python": sys.version.split()[0],
            "split_rule": f"sha256(relative path)[:8] < {val_frac} * 2**64 -> validation",
            "files_train": len(train_files), "files_val": len(val_files),
            "bytes_train": train_bytes, "bytes_val": val_bytes}
    return Corpus(train, val, info)


def train_batch(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, seq + 1) windows at random offsets drawn from ``gen``."""
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    return data[starts[:, None] + torch.arange(seq + 1)].long()


def val_windows(data: torch.Tensor, seq: int, tokens: int) -> torch.Tensor:
    """Evenly spaced (n, seq + 1) windows over the whole validation stream (no RNG)."""
    n = max(1, min(tokens // seq, (data.numel() - 1) // seq))
    last = data.numel() - seq - 1
    starts = torch.tensor([i * last // max(1, n - 1) for i in range(n)])
    return data[starts[:, None] + torch.arange(seq + 1)].long()


# ----------------------------------------------------------------------------- FFN modules
class PEER(nn.Module):
    """PEER-style layer: multi-head product-key retrieval of single-neuron experts.

    Each head h projects the token to a query, splits it into two halves and scores them
    against its own two tables of N sub-keys; expert (i, j) of the N x N grid scores
    s1[i] + s2[j].  The head's k best experts (exact: ``omni_router`` is the product-key
    top-k) are weighted by a softmax over their k scores, and every head's experts share
    the (E, H) input and output tables, so

        out = sum_heads sum_r softmax(s)_r * act(u_e . x) * v_e      (``omni_expert``)

    Queries are normalised per token (PEER normalises them with BatchNorm; per token
    keeps the model causal, like the omnimoe arm's default router norm).
    """

    def __init__(self, hidden: int, num_experts: int, heads: int, key_dim: int, k: int,
                 act: str = "silu", table_init: float = 1.0):
        super().__init__()
        n = math.isqrt(num_experts)
        if n * n != num_experts or key_dim % 2:
            raise ValueError(f"PEER needs a square num_experts and an even key_dim, got "
                             f"{num_experts}, {key_dim}")
        self.hidden, self.n, self.heads, self.half, self.k, self.act = hidden, n, heads, key_dim // 2, k, act
        self.query = nn.Linear(hidden, heads * key_dim, bias=False)
        self.sub_keys = nn.Parameter(torch.empty(heads, 2, n, key_dim // 2))
        self.up_embed = nn.Embedding(num_experts, hidden)
        self.down_embed = nn.Embedding(num_experts, hidden)
        nn.init.normal_(self.query.weight, std=0.02)
        nn.init.normal_(self.sub_keys, std=1.0 / math.sqrt(key_dim // 2))   # unit-scale scores
        # the omnimoe arm's initialisation (OmniMoEForCausalLM)
        nn.init.normal_(self.up_embed.weight, std=table_init / math.sqrt(hidden))
        nn.init.normal_(self.down_embed.weight, std=table_init * 0.02)
        self.last_indices = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, self.hidden)
        T = h.shape[0]
        q = self.query(h)
        # Scores, router and experts in float32: bf16 scores tie, and the expert kernels
        # compute in float32 whatever their input dtype.
        with torch.autocast(h.device.type, enabled=False):
            q = F.layer_norm(q.float().view(T, self.heads, 2, self.half), (self.half,))
            s = torch.einsum("thcd,hcnd->thcn", q, self.sub_keys.float())
            sx = s[:, :, 0].reshape(T * self.heads, self.n)
            sy = s[:, :, 1].reshape(T * self.heads, self.n)
            scores, idx = omni_router(sx, sy, self.n, self.k)
            w = torch.softmax(scores, dim=-1).view(T, self.heads * self.k)
            idx = idx.view(T, self.heads * self.k)
            self.last_indices = idx.detach()
            out = omni_expert(h, self.up_embed.weight, self.down_embed.weight, w, idx, self.act)
        return out.to(x.dtype).view(x.shape)


class TokenChoiceMoE(nn.Module):
    """Token-choice top-k mixture of SwiGLU experts (Mixtral / Qwen-MoE style).

    A linear router scores the n experts, softmax, the k best are kept and their
    probabilities renormalised to sum to 1; each expert is a SwiGLU MLP of width I.
    ``aux_loss`` is the Switch-Transformer balance loss of the last forward, n * sum_i
    f_i P_i (f_i: share of the token-slot assignments routed to expert i, P_i: mean
    router probability), 1 when routing is uniform.  Experts run one after the other
    on their sorted tokens (one host sync per layer for the group sizes).
    """

    def __init__(self, hidden: int, num_experts: int, k: int, width: int, act: str = "silu"):
        super().__init__()
        self.hidden, self.n, self.k, self.width = hidden, num_experts, k, width
        self.act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[act]
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * width, hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, width))
        for p in (self.router.weight, self.gate_up, self.down):
            nn.init.normal_(p, std=0.02)   # transformers' Mixtral initialisation
        self.last_probs = self.last_indices = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, self.hidden)
        probs = torch.softmax(self.router(h).float(), dim=-1)
        top_w, top_i = probs.topk(self.k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        self.last_probs, self.last_indices = probs, top_i.detach()
        flat = top_i.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // self.k
        sizes = torch.bincount(flat, minlength=self.n).tolist()
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else self.down.dtype
        w1, w2 = self.gate_up.to(dt), self.down.to(dt)   # one cast per layer, not per expert
        ys = []
        for e, xe in enumerate(h[token].to(dt).split(sizes)):
            if xe.shape[0]:
                g, u = F.linear(xe, w1[e]).chunk(2, dim=-1)
                ys.append(F.linear(self.act(g) * u, w2[e]))
        y = torch.cat(ys).float() * top_w.reshape(-1)[order, None]
        out = torch.zeros(h.shape, dtype=torch.float32, device=h.device).index_add_(0, token, y)
        return out.to(x.dtype).view(x.shape)

    def aux_loss(self) -> torch.Tensor:
        f = torch.bincount(self.last_indices.reshape(-1), minlength=self.n).float() / self.last_indices.numel()
        return self.n * (f * self.last_probs.mean(0)).sum()


# ----------------------------------------------------------------------------- parameter counts
def ffn_counts(mlp: nn.Module) -> tuple[int, int]:
    """(active, total) trainable parameters of one FFN: an expert table row counts as
    active k times per token (k of its experts), everything else always."""
    total = sum(p.numel() for p in mlp.parameters() if p.requires_grad)
    if isinstance(mlp, OmniMoE):
        tables, per_expert, k = (mlp.up_embed.weight, mlp.down_embed.weight), 2 * mlp.hidden_size, mlp.top_k
    elif isinstance(mlp, PEER):
        tables, per_expert, k = (mlp.up_embed.weight, mlp.down_embed.weight), 2 * mlp.hidden, mlp.heads * mlp.k
    elif isinstance(mlp, TokenChoiceMoE):
        tables, per_expert, k = (mlp.gate_up, mlp.down), 3 * mlp.hidden * mlp.width, mlp.k
    else:
        return total, total
    sparse = sum(t.numel() for t in tables if t.requires_grad)
    return total - sparse + (k * per_expert if sparse else 0), total


def count_params(model: nn.Module) -> dict:
    """Trainable parameters of a causal LM built here: total, active per token, and the
    same two over the decoder layers' FFNs alone (what the arms differ in)."""
    fa = ft = 0
    for layer in model.model.layers:
        a, t = ffn_counts(layer.mlp)
        fa, ft = fa + a, ft + t
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "active": total - ft + fa, "ffn_total": ft, "ffn_active": fa}


# ----------------------------------------------------------------------------- sizing
# Per-layer FFN counts of each arm (H hidden; the matching formulas of docs/quality.md):
#   dense    A = T = 3 H I
#   omnimoe  A = 3 H I_s + 2 N H + 2 H K          T = 3 H I_s + 2 N H + 2 E H
#   peer     A = h d (H + N_p) + 2 H h k          T = h d (H + N_p) + 2 N_p^2 H
#   moe      A = n H + 3 H I_e k                  T = n H + 3 H I_e n
def omnimoe_counts(H, shared, E, K):
    N = math.isqrt(E)
    return 3 * H * shared + 2 * N * H + 2 * H * K, 3 * H * shared + 2 * N * H + 2 * E * H


def peer_counts(H, n, heads, key_dim, k):
    dense = heads * key_dim * (H + n)
    return dense + 2 * H * heads * k, dense + 2 * n * n * H


def moe_counts(H, n, k, width):
    return n * H + 3 * H * width * k, n * H + 3 * H * width * n


def rel_err(a, b) -> float:
    return (a - b) / b


def omnimoe_k(H, dense_width, shared, E) -> int:
    """K with 3 H I_s + 2 N H + 2 H K = 3 H I_dense."""
    return round((3 * (dense_width - shared) - 2 * math.isqrt(E)) / 2)


def omnimoe_shared(H, dense_width, E, K) -> int:
    return round(dense_width - (2 * math.isqrt(E) + 2 * K) / 3)


def solve_peer(H, A, T, heads, key_dim=128, n=None, k=None, fixed_key_dim=False):
    """(n, k, key_dim) of a PEER layer whose counts are closest to (A, T), preferring
    key_dim near the one asked for among the candidates within MATCH_TOL; None if the
    fixed values leave no candidate."""
    best = None
    D = (T - A) / (2 * H)            # = n^2 - heads * k
    span = math.ceil(MATCH_TOL * T / (2 * H * heads)) + 1   # k values the total tolerates
    for nn_ in ([n] if n else range(2, 4 * math.isqrt(max(4, int(T // (2 * H)))) + 8)):
        kf = round((nn_ * nn_ - D) / heads)
        for kk in ([k] if k else range(max(1, kf - span), kf + span + 1)):
            if kk > nn_ * nn_:
                continue
            if fixed_key_dim:
                ds = [key_dim]
            else:
                df = (A - 2 * H * heads * kk) / (heads * (H + nn_))
                ds = {max(2, 2 * math.floor(df / 2)), max(2, 2 * math.ceil(df / 2))}
            for d in ds:
                a, t = peer_counts(H, nn_, heads, d, kk)
                err = max(abs(rel_err(a, A)), abs(rel_err(t, T)))
                key = (err > MATCH_TOL, abs(d - key_dim), err)
                if best is None or key < best[0]:
                    best = (key, (nn_, kk, d))
    return best and best[1]


def solve_moe(H, A, T, k=8, n=None, width=None, fixed_k=False):
    """(n, k, width) of a top-k MoE layer whose counts are closest to (A, T), preferring
    k near the one asked for among the candidates within MATCH_TOL; None if the fixed
    values leave no candidate."""
    best = None
    for kk in ([k] if fixed_k else range(1, 2 * k + 1)):
        for ne in ([n] if n else range(kk + 1, 4097)):
            if kk > ne:
                continue
            if width:
                ws = [width]
            else:
                wf = (A / H - ne) / (3 * kk)
                ws = {max(1, math.floor(wf)), max(1, math.ceil(wf))}
            for w in ws:
                a, t = moe_counts(H, ne, kk, w)
                err = max(abs(rel_err(a, A)), abs(rel_err(t, T)))
                key = (err > MATCH_TOL, abs(kk - k), err)
                if best is None or key < best[0]:
                    best = (key, (ne, kk, w))
    return best and best[1]


# ----------------------------------------------------------------------------- arm specs
_NUM = {"lr": float, "seeds": int, "experts": int, "k": int, "shared": int, "aux": float,
        "table_lr": float, "table_init": float, "heads": int, "key_dim": int, "width": int}
KEYS = {
    "dense": ("lr", "seeds"),
    "omnimoe": ("lr", "seeds", "experts", "k", "shared", "router_norm", "weights", "aux",
                "table_lr", "table_init"),
    "peer": ("lr", "seeds", "experts", "k", "heads", "key_dim", "table_lr", "table_init"),
    "moe": ("lr", "seeds", "experts", "k", "width", "aux"),
}
_CHOICES = {"router_norm": ("layernorm", "batchnorm", "none"), "weights": ("exp", "softmax")}


def parse_arm(spec: str) -> tuple[str, dict]:
    """'omnimoe:router_norm=batchnorm:k=128' -> ('omnimoe', {...}); UsageError naming
    the arm and the key."""
    base, *pairs = spec.strip().split(":")
    if base not in BASES:
        raise UsageError(f"--arms: unknown arm {base!r} in {spec!r}; choose from {', '.join(BASES)}")
    opts = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in KEYS[base]:
            raise UsageError(f"--arms: {spec!r}: {pair!r} is not KEY=VALUE with KEY one of "
                             f"{', '.join(KEYS[base])}")
        if key in _CHOICES:
            if value not in _CHOICES[key]:
                raise UsageError(f"--arms: {spec!r}: {key} must be one of {', '.join(_CHOICES[key])}")
            opts[key] = value
            continue
        try:
            v = _NUM[key](value)
        except ValueError:
            raise UsageError(f"--arms: {spec!r}: {key}={value!r} is not a number")
        if not math.isfinite(v) or v < 0 or (v == 0 and key not in ("shared", "aux")):
            raise UsageError(f"--arms: {spec!r}: {key} must be {'>= 0' if key in ('shared', 'aux') else '> 0'}")
        opts[key] = v
    return base, opts


def _square(spec, E):
    n = math.isqrt(E)
    if n * n != E:
        raise UsageError(f"--arms: {spec!r}: experts must be a perfect square (N x N grid), "
                         f"got {E}; nearest {n * n} or {(n + 1) ** 2}")
    return E


def reference_counts(sizes: Sizes) -> tuple[int, int]:
    """(A, T): per-layer FFN active parameters of dense, total of the default omnimoe."""
    H = sizes.hidden
    K = omnimoe_k(H, sizes.dense_width, sizes.shared_width, sizes.experts)
    return 3 * H * sizes.dense_width, omnimoe_counts(H, sizes.shared_width, sizes.experts, K)[1]


def resolve(spec: str, sizes: Sizes, train: TrainConfig, default_seeds: int) -> Plan:
    base, o = parse_arm(spec)
    H, A, T = sizes.hidden, *reference_counts(sizes)
    seeds = int(o.get("seeds", default_seeds if base in ("dense", "omnimoe") else 1))
    enforce = True
    if base == "dense":
        ffn = {"width": sizes.dense_width}
    elif base == "omnimoe":
        E = _square(spec, int(o.get("experts", sizes.experts)))
        if "k" in o and "shared" in o:
            K, shared, enforce = int(o["k"]), int(o["shared"]), False
        elif "k" in o:
            K = int(o["k"])
            shared = omnimoe_shared(H, sizes.dense_width, E, K)
        else:
            shared = int(o.get("shared", sizes.shared_width))
            K = omnimoe_k(H, sizes.dense_width, shared, E)
        if not 1 <= K <= E or shared < 0:
            raise UsageError(f"--arms: {spec!r}: no match: K = {K}, I_shared = {shared} "
                             f"(need 1 <= K <= E = {E}, I_shared >= 0)")
        ffn = {"experts": E, "k": K, "shared": shared, "router_norm": o.get("router_norm", "layernorm"),
               "weights": o.get("weights", "exp"), "aux": o.get("aux", 0.01),
               "table_lr": o.get("table_lr", 1.0), "table_init": o.get("table_init", 1.0)}
    elif base == "peer":
        heads = int(o.get("heads", sizes.peer_heads))
        n = math.isqrt(_square(spec, int(o["experts"]))) if "experts" in o else None
        enforce = not ("experts" in o and "k" in o and "key_dim" in o)
        key_dim = int(o.get("key_dim", sizes.peer_key_dim))
        if key_dim % 2:
            raise UsageError(f"--arms: {spec!r}: key_dim must be even (two half-queries)")
        found = solve_peer(H, A, T, heads, key_dim, n, int(o["k"]) if "k" in o else None,
                           fixed_key_dim="key_dim" in o)
        if found is None:
            raise UsageError(f"--arms: {spec!r}: no PEER sizes fit (k must be <= experts)")
        n, k, d = found
        ffn = {"experts": n * n, "k": k, "heads": heads, "key_dim": d,
               "table_lr": o.get("table_lr", 1.0), "table_init": o.get("table_init", 1.0)}
    else:
        enforce = not ("experts" in o and "k" in o and "width" in o)
        found = solve_moe(H, A, T, int(o.get("k", sizes.moe_k)), int(o.get("experts", 0)) or None,
                          int(o.get("width", 0)) or None, fixed_k="k" in o)
        if found is None:
            raise UsageError(f"--arms: {spec!r}: no MoE sizes fit (k must be <= experts)")
        n, k, w = found
        ffn = {"experts": n, "k": k, "width": w, "aux": o.get("aux", 0.01)}
    return Plan(spec.strip(), base, tuple(sorted(ffn.items())), float(o.get("lr", train.lr)),
                seeds, enforce)


def resolve_all(arms_text: str, sizes: Sizes, train: TrainConfig, n_seeds: int) -> list[Plan]:
    plans = [resolve(s, sizes, train, n_seeds) for s in arms_text.split(",") if s.strip()]
    if not plans:
        raise UsageError("--arms: no arms given")
    labels = [p.label for p in plans]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--arms: an arm is listed twice ({', '.join(labels)})")
    for p in plans:
        if p.seeds > n_seeds:
            raise UsageError(f"--arms: {p.label!r}: seeds={p.seeds} but --seeds lists {n_seeds}")
    return plans


# ----------------------------------------------------------------------------- models
def llama_fields(sizes: Sizes, width: int) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=sizes.hidden, intermediate_size=width,
                num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                num_key_value_heads=sizes.heads, max_position_embeddings=sizes.seq,
                bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)


def _softmax_route(block):
    """The paper's Eq. 2 weights: a softmax over the K selected scores, instead of the
    exp of each joint log-probability."""
    route = block.route

    def routed(h):
        scores, idx = route(h)
        return scores - torch.logsumexp(scores, dim=-1, keepdim=True), idx

    block.route = routed


def build_model(plan: Plan, sizes: Sizes, seed: int, device="cpu") -> nn.Module:
    """The arm's causal LM; the trunk (embeddings, attention, norms, head) is the dense
    model's of the same seed, so arms differ only in their FFNs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    f = dict(plan.ffn)
    with torch.device(device):
        torch.manual_seed(seed)
        dense = LlamaForCausalLM(LlamaConfig(**llama_fields(sizes, sizes.dense_width)))
        if plan.base in ("dense", "peer", "moe"):
            model = dense
            for layer in model.model.layers:
                if plan.base == "peer":
                    layer.mlp = PEER(sizes.hidden, f["experts"], f["heads"], f["key_dim"], f["k"],
                                     table_init=f["table_init"])
                elif plan.base == "moe":
                    layer.mlp = TokenChoiceMoE(sizes.hidden, f["experts"], f["k"], f["width"])
            return model
        import omni_moe.hf as ohf

        model = ohf.OmniMoEForCausalLM(ohf.OmniMoELMConfig(
            **llama_fields(sizes, max(1, f["shared"])), num_experts=f["experts"],
            num_experts_per_tok=f["k"], router_norm=f["router_norm"]))
    if device != "meta":
        trunk = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
        missing, unexpected = model.load_state_dict(trunk, strict=False)
        assert not unexpected and all(".mlp." in k for k in missing), (missing, unexpected)
    for layer in model.model.layers:
        blk = layer.mlp
        if f["shared"] == 0:   # no shared MLP: a frozen zero branch of width 1 adds exactly 0
            for lin in (blk.gate_proj, blk.up_proj, blk.down_proj):
                nn.init.zeros_(lin.weight)
                lin.weight.requires_grad_(False)
        if f["table_init"] != 1.0:
            with torch.no_grad():
                blk.up_embed.weight.mul_(f["table_init"])
                blk.down_embed.weight.mul_(f["table_init"])
        if f["weights"] == "softmax":
            _softmax_route(blk)
    return model


def table_parameters(model) -> list:
    """The expert tables (own learning rate, no weight decay) of omnimoe and peer."""
    peer = [p for m in model.modules() if isinstance(m, PEER) for p in (m.up_embed.weight, m.down_embed.weight)]
    return [p for p in expert_parameters(model) + peer if p.requires_grad]


def aux_loss(model, plan: Plan, out):
    if plan.base == "omnimoe" and plan.get("aux"):
        return out.aux_loss
    if plan.base == "moe" and plan.get("aux"):
        mods = [layer.mlp for layer in model.model.layers]
        return sum(m.aux_loss() for m in mods) / len(mods)
    return None


def experts_used(model, plan: Plan, out) -> float | None:
    """Mean over layers of the share of experts one batch routed to."""
    if plan.base == "omnimoe":
        import omni_moe.hf as ohf

        use = ohf.expert_usage(out.router_logits, plan.get("k"))
        return statistics.fmean(use.fraction_touched)
    if plan.base in ("peer", "moe"):
        fr = [layer.mlp.last_indices.unique().numel() / plan.get("experts") for layer in model.model.layers]
        return statistics.fmean(fr)
    return None


# ----------------------------------------------------------------------------- training
def lr_factor(step: int, progress: float, warmup_steps: int, decay: float) -> float:
    """Linear warm-up over ``warmup_steps``, constant, then linear to 0 over the last
    ``decay`` of the budget (``progress`` in [0, 1] before the step)."""
    w = min(1.0, (step + 1) / max(1, warmup_steps))
    d = 1.0 if decay <= 0 or progress <= 1 - decay else max(0.0, (1 - progress) / decay)
    return w * d


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _precision(device, precision):
    if precision == "amp":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def forward(model, plan, x, ctx, router_logits=False):
    """The model's output on token ids ``x``; ``router_logits``: an omnimoe model also
    returns its router log-probabilities and balance loss."""
    kw = {"use_cache": False}
    if plan.base == "omnimoe":
        kw["output_router_logits"] = router_logits
    with ctx():
        return model(input_ids=x, **kw)


@torch.no_grad()
def evaluate(model, plan, windows, batch, device, ctx) -> float:
    """Mean nats per byte over the windows' byte targets (separator targets excluded)."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch].to(device)
        tgt = w[:, 1:].masked_fill(w[:, 1:] == SEP, -100)
        logits = forward(model, plan, w[:, :-1], ctx).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-100,
                                 reduction="sum")
        count += int((tgt != -100).sum())
    model.train()
    return float(total) / max(1, count)


def train_arm(plan: Plan, seed: int, sizes: Sizes, tc: TrainConfig, corpus: Corpus, device,
              say=print) -> dict:
    """Train one arm with one seed; the JSON row."""
    wall0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(plan, sizes, seed).to(device)
    if tc.precision == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    counts = count_params(model)
    tables = table_parameters(model)
    ids = {id(p) for p in tables}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": rest, "lr": plan.lr, "peak": plan.lr}]
    if tables:
        tlr = plan.lr * plan.get("table_lr", 1.0)
        groups.append({"params": tables, "lr": tlr, "peak": tlr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=tc.weight_decay,
                            fused=device.type == "cuda")
    params = [p for g in groups for p in g["params"]]
    ctx = _precision(device, tc.precision)
    gen = torch.Generator().manual_seed(seed)
    windows = val_windows(corpus.val, sizes.seq, tc.val_tokens)
    step_tokens = sizes.batch * sizes.seq

    tokens = step = 0
    train_s = first_step_s = 0.0
    mark = None
    loss_sum = torch.zeros((), device=device)
    loss_n = 0
    next_eval, curve, stopped_by, last = 1.0 / tc.evals, [], None, None
    start = time.perf_counter()

    def progress(now):
        p = 0.0
        if tc.tokens:
            p = tokens / tc.tokens
        if tc.budget_s and mark is not None:
            p = max(p, (train_s + now - mark) / tc.budget_s)
        return p

    while stopped_by is None:
        f = lr_factor(step, progress(time.perf_counter()), tc.warmup_steps, tc.decay)
        for g in opt.param_groups:
            g["lr"] = g["peak"] * f
        batch = train_batch(corpus.train, sizes.batch, sizes.seq, gen).to(device, non_blocking=True)
        out = forward(model, plan, batch[:, :-1], ctx, router_logits=bool(plan.get("aux")))
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten())
        aux = aux_loss(model, plan, out)
        total = loss if aux is None else loss + plan.get("aux") * aux
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        loss_n += 1
        tokens += step_tokens
        step += 1
        if mark is None:   # the first step compiles kernels: timed apart
            _sync(device)
            first_step_s = time.perf_counter() - start
            mark = time.perf_counter()
        p = progress(time.perf_counter())
        if p >= 1:
            stopped_by = "tokens" if tc.tokens and tokens >= tc.tokens else "time"
        if p >= next_eval or stopped_by:
            _sync(device)
            train_s += time.perf_counter() - mark
            last = float(loss_sum) / loss_n
            loss_sum.zero_()
            loss_n = 0
            if not math.isfinite(last):
                stopped_by = "diverged"
                curve.append([tokens, round(train_s, 3), float("nan")])
            else:
                bpb = evaluate(model, plan, windows, sizes.batch, device, ctx) / math.log(2)
                curve.append([tokens, round(train_s, 3), bpb])
                say(f"  [{plan.label} seed {seed}] {tokens / 1e6:8.3f}M tokens  {train_s:7.1f} s  "
                    f"val {bpb:.4f} bpb  train {last:.4f} nats/token  "
                    f"{(tokens - step_tokens) / max(train_s, 1e-9):,.0f} tok/s", flush=True)
            while next_eval <= p:
                next_eval += 1.0 / tc.evals
            _sync(device)
            mark = time.perf_counter()

    # expert usage on the first validation batch
    model.eval()
    with torch.no_grad():
        out = forward(model, plan, windows[:sizes.batch, :-1].to(device), ctx, router_logits=True)
        used = experts_used(model, plan, out)
    bpb = curve[-1][2]
    row = {
        "arm": plan.label, "base": plan.base, "seed": seed,
        "active_params": counts["active"], "total_params": counts["total"],
        "ffn_active_params": counts["ffn_active"], "ffn_total_params": counts["ffn_total"],
        "tokens": tokens, "train_s": round(train_s, 3), "first_step_s": round(first_step_s, 3),
        "tokens_per_s": (tokens - step_tokens) / train_s if train_s > 0 else None,
        "peak_mem_GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "val_loss": bpb * math.log(2), "val_bpb": bpb, "train_loss": last, "curve": curve,
        "stopped_by": stopped_by, "experts_used": used, "wall_s": round(time.perf_counter() - wall0, 3),
        "config": {"ffn": dict(plan.ffn), "lr": plan.lr, "sizes": asdict(sizes), "train": asdict(tc),
                   "device": str(device)},
    }
    del model, opt, params, groups, rest, tables, out
    gc.collect()
    return row


def preflight(plans, sizes: Sizes, tc: TrainConfig, device) -> None:
    """One training step and one evaluation forward of every arm at full size before any
    arm trains: a crash (a dtype the kernels reject, memory) shows in seconds, not after
    the first arms' minutes, and the kernels it compiles are cached for the real runs."""
    ctx = _precision(device, tc.precision)
    for plan in plans:
        try:
            model = build_model(plan, sizes, 0).to(device)
            if tc.precision == "bf16":
                model = model.to(torch.bfloat16)
            x = torch.randint(0, VOCAB, (sizes.batch, sizes.seq), device=device)
            out = forward(model, plan, x, ctx, router_logits=bool(plan.get("aux")))
            aux = aux_loss(model, plan, out)
            loss = out.logits.float().logsumexp(-1).mean() + (0 if aux is None else aux)
            loss.backward()
            model.eval()
            with torch.no_grad():
                forward(model, plan, x, ctx, router_logits=True)
            _sync(device)
        except Exception as e:   # noqa: BLE001 -- reported, then the run stops
            msg = " ".join(str(e).split())[:300]
            hint = "; try --dtype bf16" if tc.precision == "amp" else ""
            raise RuntimeError(f"arm {plan.label!r} fails one step under --dtype {tc.precision}: "
                               f"{type(e).__name__}: {msg}{hint}") from None
        finally:
            model = out = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- report
def _m(n):
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def match_report(row, ref) -> dict:
    """Relative differences of the row's FFN counts from the references: active vs the
    dense arm, total vs the default omnimoe arm (peer and moe)."""
    out = {"active_vs_dense": rel_err(row["ffn_active_params"], ref["ffn_active"])}
    if row["base"] in ("peer", "moe"):
        out["total_vs_omnimoe"] = rel_err(row["ffn_total_params"], ref["ffn_total"])
    out["ok"] = all(abs(v) <= MATCH_TOL for k, v in out.items())
    return out


def plan_table(plans, sizes: Sizes, say=print) -> dict:
    """Build every arm on the meta device, print sizes and counts, and check the
    matching; returns the reference counts.  UsageError when an arm whose sizes were
    chosen to match does not."""
    ref_dense = count_params(build_model(resolve("dense", sizes, TrainConfig(), 1), sizes, 0, "meta"))
    ref_omni = count_params(build_model(resolve("omnimoe", sizes, TrainConfig(), 1), sizes, 0, "meta"))
    ref = {"ffn_active": ref_dense["ffn_active"], "ffn_total": ref_omni["ffn_total"]}
    say(f"{'arm':34s} {'active':>8s} {'total':>8s} {'FFN act':>8s} {'FFN tot':>8s} {'match':>16s}  FFN")
    for p in plans:
        c = count_params(build_model(p, sizes, 0, "meta"))
        row = {"base": p.base, "ffn_active_params": c["ffn_active"], "ffn_total_params": c["ffn_total"]}
        m = match_report(row, ref)
        sz = " ".join(f"{k}={v}" for k, v in p.ffn if k not in ("table_lr", "table_init") or v != 1.0)
        diffs = " ".join(f"{v:+.2%}" for k, v in m.items() if k != "ok")
        say(f"{p.label:34s} {_m(c['active']):>8s} {_m(c['total']):>8s} {_m(c['ffn_active']):>8s} "
            f"{_m(c['ffn_total']):>8s} {diffs:>16s}  {sz}{'' if m['ok'] else ' (unmatched)'}")
        if p.enforce_match and not m["ok"]:
            raise UsageError(f"arm {p.label!r}: no sizes match within {MATCH_TOL:.0%} ({diffs}); "
                             "give its sizes explicitly or change the model sizes")
    return ref


def print_table(rows, say=print) -> None:
    say(f"\n{'arm':34s} {'seed':>4s} {'active':>8s} {'total':>8s} {'tokens':>8s} {'time s':>7s} "
        f"{'tok/s':>9s} {'peak GiB':>8s} {'val bpb':>8s} {'experts':>7s}  stop")
    for r in rows:
        mem = f"{r['peak_mem_GiB']:.2f}" if r.get("peak_mem_GiB") is not None else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        used = f"{r['experts_used']:.0%}" if r.get("experts_used") is not None else "-"
        say(f"{r['arm']:34s} {r['seed']:4d} {_m(r['active_params']):>8s} {_m(r['total_params']):>8s} "
            f"{_m(r['tokens']):>8s} {r['train_s']:7.1f} {tps:>9s} {mem:>8s} {r['val_bpb']:8.4f} "
            f"{used:>7s}  {r['stopped_by']}{'' if r.get('match', {}).get('ok', True) else ' unmatched'}")
    say(f"\n{'arm':34s} {'seeds':>5s} {'mean bpb':>9s} {'spread':>8s} {'vs dense':>9s} {'tokens':>8s} {'tok/s':>9s}")
    by_arm = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append(r)
    dense = by_arm.get("dense")
    dense_mean = statistics.fmean(r["val_bpb"] for r in dense) if dense else None
    for arm, rs in by_arm.items():
        b = [r["val_bpb"] for r in rs]
        mean = statistics.fmean(b)
        vs = f"{mean - dense_mean:+.4f}" if dense_mean is not None and arm != "dense" else "-"
        tps = [r["tokens_per_s"] for r in rs if r.get("tokens_per_s")]
        say(f"{arm:34s} {len(rs):5d} {mean:9.4f} {max(b) - min(b):8.4f} {vs:>9s} "
            f"{_m(statistics.fmean(r['tokens'] for r in rs)):>8s} "
            f"{(statistics.fmean(tps) if tps else 0):9,.0f}")
    say("spread: max - min over the arm's seeds; vs dense: mean bpb minus the dense arm's mean "
        "(negative = better)")


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r in rows:
        c = colors[arms.index(r["arm"]) % len(colors)]
        ls = ("-", "--", ":", "-.")[r["seed"] % 4]
        tok = [p[0] / 1e6 for p in r["curve"]]
        sec = [p[1] for p in r["curve"]]
        bpb = [p[2] for p in r["curve"]]
        a.plot(tok, bpb, ls, color=c, marker="o", ms=3, label=f"{r['arm']} (seed {r['seed']})")
        b.plot(sec, bpb, ls, color=c, marker="o", ms=3)
    a.set_xlabel("training tokens (M)")
    b.set_xlabel("training time (s)")
    a.set_ylabel("validation bits per byte")
    env = rows[0].get("env", {})
    fig.suptitle(f"byte-level LM on Python source files -- {env.get('gpu') or 'CPU'}, "
                 f"{(env.get('date') or '')[:10]}")
    a.legend(fontsize=7)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_rows(paths) -> tuple[list, dict]:
    rows, corpus = [], {}
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as e:
            raise UsageError(f"--from-json {path}: cannot read it ({e.strerror or e})")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"--from-json {path}: not a JSON file ({' '.join(str(e).split())})")
        if not (isinstance(data, dict) and data.get("benchmark") == "lm_quality"
                and isinstance(data.get("rows"), list)):
            raise UsageError(f"--from-json {path}: not a file written by benchmarks/lm_quality.py --json")
        rows += data["rows"]
        corpus = corpus or data.get("corpus", {})
    return rows, corpus


def write_json(path, rows, corpus, extra=None) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"benchmark": "lm_quality", "corpus": corpus, "rows": rows, **(extra or {})}, f, indent=1)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- command line
def _count(text: str) -> int:
    """'20M' / '512k' / '1e6' / '16384' -> int."""
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    try:
        v = float(text[:-1] if mult > 1 else text) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count such as 16384, 512k or 20M, got {text!r}")
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {text!r}")
    return int(v)


def build_parser():
    d, t = Sizes(), TrainConfig()
    p = common.ArgumentParser(prog="lm_quality.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="toy sizes on the CPU (smoke run): its defaults replace those of options not given")
    p.add_argument("--arms", default="dense,omnimoe,peer,moe", help="arms, comma-separated (see the module docstring)")
    p.add_argument("--seeds", default="0,1", help="seeds, comma-separated (dense and omnimoe run all)")
    p.add_argument("--tokens", type=_count, default=t.tokens, help="token budget per arm (e.g. 50M)")
    p.add_argument("--budget-s", type=float, default=t.budget_s,
                   help=f"training seconds per arm (default {t.budget_s:g}; 0: none)")
    for name, help_ in (("hidden", "model width H"), ("layers", "decoder layers"), ("heads", "attention heads"),
                        ("seq", "tokens per sequence"), ("batch", "sequences per step"),
                        ("dense-width", "dense MLP width I_dense"),
                        ("shared-width", "omnimoe shared MLP width I_shared"),
                        ("experts", "omnimoe experts E (a perfect square)")):
        dest = name.replace("-", "_")
        p.add_argument(f"--{name}", type=int, default=getattr(d, dest), help=f"{help_} (default {getattr(d, dest)})")
    p.add_argument("--lr", type=float, default=t.lr, help=f"peak learning rate, AdamW (default {t.lr:g})")
    p.add_argument("--warmup-steps", type=int, default=t.warmup_steps)
    p.add_argument("--decay", type=float, default=t.decay, help="fraction of the budget of linear decay to 0")
    p.add_argument("--weight-decay", type=float, default=t.weight_decay)
    p.add_argument("--evals", type=int, default=t.evals, help="validation points per arm")
    p.add_argument("--val-tokens", type=_count, default=t.val_tokens, help="validation tokens per evaluation")
    p.add_argument("--val-frac", type=float, default=0.05, help="share of files held out (hash rule)")
    p.add_argument("--corpus", action="append", default=[], metavar="DIR", help="add a source tree (repeatable)")
    p.add_argument("--suffixes", default=".py", help="file suffixes of the corpus, comma-separated")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("amp", "bf16", "fp32"), default=None,
                   help="amp: fp32 weights, bf16 autocast (default on CUDA); bf16: bf16 weights; "
                        "fp32 (default on CPU)")
    p.add_argument("--no-preflight", action="store_true", help="skip the one-step check of every arm before training")
    p.add_argument("--json", metavar="PATH", help="write the rows here (after every run)")
    p.add_argument("--plot", metavar="PNG", help="validation bpb against tokens and time (needs matplotlib)")
    p.add_argument("--from-json", nargs="+", metavar="PATH",
                   help="train nothing: merge saved --json files, print the table (and --plot/--json)")
    return p


def parse_args(argv=None):
    p = build_parser()
    if "--tiny" in (argv if argv is not None else sys.argv[1:]):
        p.set_defaults(**{k: v for k, v in asdict(TINY).items() if not k.startswith(("peer", "moe"))},
                       seeds="0", tokens=16384, budget_s=0.0, warmup_steps=5, evals=4, val_tokens=4096,
                       device="cpu")
    return p.parse_args(argv)


def repeat_note(tokens, bytes_train: int) -> str | None:
    """A warning when the token budget passes over the training bytes more than once:
    every arm then trains on repeated data, which favours the arms with fewer
    parameters (one byte is one token, plus a separator per file)."""
    if not tokens or tokens <= bytes_train:
        return None
    return (f"warning: {tokens:,} tokens per arm are {tokens / bytes_train:.1f} passes over the "
            f"{bytes_train / 1e6:.1f} MB of training files: every arm repeats data; add source "
            "trees with --corpus DIR (docs/quality.md)")


def main(argv=None) -> int:
    try:
        return _main(parse_args(argv))
    except UsageError as e:
        print(f"lm_quality.py: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"lm_quality.py: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


def _main(args) -> int:
    common.check_run_arguments(argparse.Namespace(from_json=None, cases=None, json=args.json,
                                                         plot=args.plot))
    if args.from_json:
        rows, corpus = load_rows(args.from_json)
        try:
            print_table(rows)
            if args.plot:
                plot(rows, args.plot)
                print(f"plot: {args.plot}")
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UsageError(f"--from-json: unexpected content ({type(e).__name__}: {e})")
        if args.json:
            write_json(args.json, rows, corpus)
        return 0
    try:
        import transformers
        import omni_moe.hf  # noqa: F401
    except ImportError as e:
        raise UsageError(f"needs transformers: pip install 'omni-moe[hf]' ({e})")
    base_sizes = TINY if args.tiny else Sizes()
    sizes = replace(base_sizes, hidden=args.hidden, layers=args.layers, heads=args.heads, seq=args.seq,
                    batch=args.batch, dense_width=args.dense_width, shared_width=args.shared_width,
                    experts=args.experts)
    for name in ("hidden", "layers", "heads", "seq", "batch", "dense_width", "shared_width", "experts"):
        if getattr(sizes, name) < (0 if name == "shared_width" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(sizes, name)}")
    if sizes.hidden % sizes.heads:
        raise UsageError(f"--hidden ({sizes.hidden}) must be a multiple of --heads ({sizes.heads})")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds: expected integers separated by commas, got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds: expected distinct integers, got {args.seeds!r}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available")
    precision = args.dtype or ("amp" if device.type == "cuda" else "fp32")
    budget_s = args.budget_s or None
    if not args.tokens and not budget_s:
        raise UsageError("give a budget: --tokens and/or --budget-s")
    for name in ("evals", "val_tokens", "warmup_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.val_frac < 1 or not 0 <= args.decay <= 1 or not args.lr > 0:
        raise UsageError("--val-frac must be in (0, 1), --decay in [0, 1], --lr > 0")
    tc = TrainConfig(tokens=args.tokens or None, budget_s=budget_s, lr=args.lr, warmup_steps=args.warmup_steps,
                     decay=args.decay, weight_decay=args.weight_decay, evals=args.evals,
                     val_tokens=args.val_tokens, precision=precision)
    plans = resolve_all(args.arms, sizes, tc, len(seeds))
    suffixes = tuple(s.strip() for s in args.suffixes.split(",") if s.strip())
    corpus = load_corpus(args.corpus, suffixes, args.val_frac)
    ci = corpus.info
    print(f"corpus: {ci['files_train']} training files ({ci['bytes_train'] / 1e6:.2f} MB), "
          f"{ci['files_val']} validation files ({ci['bytes_val'] / 1e6:.2f} MB) from "
          f"{', '.join(ci['roots'])} (Python {ci['python']}); split: {ci['split_rule']}")
    note = repeat_note(tc.tokens, ci["bytes_train"])
    if note:
        print(note)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = {**common.environment(), "transformers": transformers.__version__}
    print(f"device: {env['gpu'] or 'cpu'}; precision {precision}; H={sizes.hidden}, {sizes.layers} layers, "
          f"{sizes.heads} heads, seq {sizes.seq}, batch {sizes.batch}; budget per arm: "
          f"{f'{tc.tokens:,} tokens' if tc.tokens else ''}{' / ' if tc.tokens and tc.budget_s else ''}"
          f"{f'{tc.budget_s:g} s' if tc.budget_s else ''}; lr {tc.lr:g}, warm-up {tc.warmup_steps} steps, "
          f"decay over the last {tc.decay:.0%}")
    ref = plan_table(plans, sizes)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("note: TRITON_INTERPRET is set, so CPU tensors run the Triton interpreter (slow); "
              "unset it for the PyTorch paths", file=sys.stderr)
    if not args.no_preflight:
        preflight(plans, sizes, tc, device)
        print("preflight: one step of every arm ran")
    rows = []
    for plan in plans:
        for seed in seeds[:plan.seeds]:
            row = train_arm(plan, seed, sizes, tc, corpus, device)
            row["match"] = match_report(row, ref)
            row["env"] = env
            rows.append(row)
            if args.json:
                write_json(args.json, rows, ci)
    print_table(rows)
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
