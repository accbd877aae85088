"""Where the bf16 layer's gradient error against the float64 layer formula comes from.

    python benchmarks/bf16_layer_error.py [--seeds 20] [--variants as-is f32-logits ...]
    TRITON_INTERPRET=1 python benchmarks/bf16_layer_error.py --seeds 5   # the kernels

The case of docs/testing.md ("bf16 layer against float64"): a bf16 ``OmniMoE`` (T=32,
H=64, I=128, E=144, k=6, silu, batchnorm; ``up_embed`` normal with std H^-1/2,
``down_embed`` with std 1), three forward/backward passes on fresh random inputs with an
Adam step after each.  On the third pass, per seed, the relative L2 error of one
gradient (default d up_embed) against float64 evaluations of the layer formula
(``OmniMoEReference``):

    flips        tokens whose k experts differ from the float64 formula's own top-k
    ours/free    ours against the float64 formula routing by itself
    ours/same    ours against the float64 formula on our routing (arithmetic only)
    floor        that float64 gradient rounded once to bf16 (no bf16 result is closer)
    naive/same   the formula in bf16 (every op rounding), on our routing
    naive/free   the bf16 formula routing by itself, against the float64 one
    nflips       tokens the bf16 formula routes differently from the float64 one

Variants (monkeypatched here, never in the library):

    as-is           the layer as it is
    f32-logits      router gate GEMMs with float32 output (bf16 inputs, no rounding of
                    the logits)
    bf16-weights    routing weights exp(score) rounded to bf16 before the experts use
                    them (PyTorch path only)
    bf16-a          expert pre-activations u.h rounded to bf16 and used so by forward
                    and backward (PyTorch path only)

CPU only; no timing.  ``--json PATH`` writes every row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from omni_moe import OmniMoE, OmniMoEConfig
from omni_moe.layers.reference import OmniMoEReference
from omni_moe.ops._dispatch import use_triton
from omni_moe.ops.expert import op as expert_op
from omni_moe.ops.expert import reference as expert_ref

VARIANTS = ("as-is", "f32-logits", "bf16-weights", "bf16-a")
TORCH_ONLY = ("bf16-weights", "bf16-a")
COLUMNS = ("flips", "ours/free", "ours/same", "floor", "naive/same", "naive/free", "nflips")


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


def flipped(i1, i2) -> int:
    return int((i1.long().sort(1).values != i2.long().sort(1).values).any(1).sum())


def _f32_gate(mod, inp, out):
    return F.linear(inp[0].float(), mod.weight.float())


@contextlib.contextmanager
def patched(variant: str):
    """The library's PyTorch expert path with one bf16 round trip added."""
    saved = expert_op.expert_forward_reference, expert_op.expert_backward_reference
    if variant == "bf16-weights":
        fwd, bwd = saved

        def forward(h, up, down, w, idx, act="silu"):
            return fwd(h, up, down, w.bfloat16(), idx, act)

        def backward(go, h, up, down, w, idx, a, act="silu"):
            dh, dup, ddown, dw = bwd(go, h, up, down, w.bfloat16().float(), idx, a, act)
            return dh, dup, ddown, dw.float()

        expert_op.expert_forward_reference, expert_op.expert_backward_reference = forward, backward
    elif variant == "bf16-a":
        fwd = saved[0]

        def forward(h, up, down, w, idx, act="silu"):
            idx_l = idx.long()
            a = torch.bmm(up[idx_l].float(), h.float().unsqueeze(-1)).squeeze(-1)
            a = a.bfloat16().float()
            c = expert_ref.activation(a, act) * w.float()
            out = torch.bmm(c.unsqueeze(1), down[idx_l].float()).squeeze(1)
            return out.to(h.dtype), a

        expert_op.expert_forward_reference = forward
    try:
        yield
    finally:
        expert_op.expert_forward_reference, expert_op.expert_backward_reference = saved


def make_layer(seed: int, norm: str):
    H, I, E, k = 64, 128, 144, 6
    torch.manual_seed(seed)
    layer = OmniMoE(OmniMoEConfig(H, I, "silu", E, k, router_norm=norm))
    torch.nn.init.normal_(layer.up_embed.weight, std=H ** -0.5)
    torch.nn.init.normal_(layer.down_embed.weight, std=1.0)
    return layer.to(torch.bfloat16)


def run(seed: int, variant: str, param: str, norm: str, steps: int = 3, T: int = 32) -> dict:
    """The metrics of ``param``'s gradient on the last of ``steps`` passes."""
    layer = make_layer(seed, norm)
    if variant == "f32-logits":
        for m in (layer.router_gate_x, layer.router_gate_y):
            m.register_forward_hook(_f32_gate)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    H = layer.hidden_size
    for step in range(steps):
        x = torch.randn(T, H, generator=gen).bfloat16()
        g = torch.randn(T, H, generator=gen).bfloat16()
        refs = {name: OmniMoEReference.from_module(layer, dt) for name, dt in (
            ("same", torch.float64), ("free", torch.float64),
            ("naive", torch.bfloat16), ("naive_free", torch.bfloat16))}
        xin = x.clone().requires_grad_() if param == "input" else x
        with patched(variant):
            out, (_, idx) = layer(xin, return_routing=True)
            out.backward(g)
        if step == steps - 1:
            ours = xin.grad if param == "input" else layer.get_parameter(param).grad
            ours = ours.to_dense() if ours.is_sparse else ours
            grads, routes = {}, {}
            for name, ref in refs.items():
                dt = next(ref.parameters()).dtype
                xr = x.to(dt).requires_grad_()
                o, (_, ri) = ref(xr, indices=None if name.endswith("free") else idx,
                                 return_routing=True)
                o.backward(g.to(dt))
                grads[name] = xr.grad if param == "input" else ref.get_parameter(param).grad
                routes[name] = ri
            return {"flips": flipped(idx, routes["free"]),
                    "ours/free": rel(ours, grads["free"]), "ours/same": rel(ours, grads["same"]),
                    "floor": rel(grads["same"].bfloat16(), grads["same"]),
                    "naive/same": rel(grads["naive"], grads["same"]),
                    "naive/free": rel(grads["naive_free"], grads["free"]),
                    "nflips": flipped(routes["naive_free"], routes["free"])}
        opt.step()
        opt.zero_grad()
    raise AssertionError("unreachable")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20, help="seeds 0 .. SEEDS-1 (default 20)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                    help="default: all that apply to this path")
    ap.add_argument("--param", default="up_embed.weight",
                    help="the gradient compared: a parameter name or 'input'")
    ap.add_argument("--norm", default="batchnorm", choices=("batchnorm", "layernorm", "none"))
    ap.add_argument("--per-seed", action="store_true", help="print every seed's row")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        print("bf16_layer_error.py: --seeds must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    kernels = use_triton(torch.empty(0))
    variants = args.variants or [v for v in VARIANTS if not (kernels and v in TORCH_ONLY)]
    if kernels and any(v in TORCH_ONLY for v in variants):
        print(f"bf16_layer_error.py: {', '.join(TORCH_ONLY)} patch the PyTorch path; run "
              "them without TRITON_INTERPRET", file=sys.stderr)
        return 2
    valid = {n for n, _ in make_layer(0, args.norm).named_parameters()} | {"input"}
    if args.param not in valid:
        print(f"bf16_layer_error.py: --param must be one of {sorted(valid)}", file=sys.stderr)
        return 2
    print(f"path: {'Triton kernels (interpreter)' if kernels else 'PyTorch'}; torch "
          f"{torch.__version__}; d {args.param}, pass 3 of 3, seeds 0..{args.seeds - 1}")
    rows = []
    head = f"{'variant':13s} " + " ".join(f"{c:>22s}" for c in COLUMNS)
    print(head + "\n" + "-" * len(head))
    for variant in variants:
        got = []
        for seed in range(args.seeds):
            r = run(seed, variant, args.param, args.norm)
            got.append(r)
            rows.append({"variant": variant, "seed": seed, **r})
            if args.per_seed:
                print(f"  seed {seed:3d} " + " ".join(
                    f"{c} {r[c]:.4f}" if isinstance(r[c], float) else f"{c} {r[c]}" for c in COLUMNS))
        cells = []
        for c in COLUMNS:
            vals = [r[c] for r in got]
            if c.endswith("flips"):
                cells.append(f"{sum(vals) / len(vals):5.2f} ({sum(v > 0 for v in vals):2d} seeds)")
            else:
                cells.append(f"{100 * statistics.median(vals):5.2f}% (max {100 * max(vals):5.2f}%)")
        print(f"{variant:13s} " + " ".join(f"{c:>22s}" for c in cells), flush=True)
    print("flips: mean per call (seeds with any); errors: median (max) over seeds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
