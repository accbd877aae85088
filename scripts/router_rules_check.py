"""Launch-rule check for the pruned router (not library code; one device call).

For each case, every listed configuration is checked against the PyTorch pruned
reference, then timed REPS times, interleaved: do_bench median over 4 rotating input sets
(host included) and per-call time from a CUDA graph of 20 calls (GPU only).

    PYTHONPATH=. python3 scripts/router_rules_check.py OUT_DIR [--reps 3] [--set rules|lpt]

`rules` (default): streaming LPT and streaming vs warp at the shapes that set
`default_config`'s rules; `lpt`: threads per token at T = 8192, 16384, 65536; `warps`: warps per program.
Writes OUT_DIR/rules_check.json.
"""
import argparse
import json
import os

import torch
import triton

from omni_moe.reference import router_pruned
from omni_moe.triton.omni_router_optimized import pruned_router_forward


def stream(lpt, warps=None):
    cfg = {"kernel": "stream", "lpt": lpt, "gsplit": lpt > 1}
    if warps:
        cfg["warps"] = warps
    return (f"lpt{lpt}" + (f"w{warps}" if warps else "")), cfg


WARP = ("warp", {"kernel": "warp"})
SETS = {
    "rules": {
        (65536, 256, 16): [stream(1), stream(2)],
        (32768, 256, 16): [stream(1), stream(2)],
        (4096, 1024, 16): [WARP] + [stream(v) for v in (4, 8, 16, 32)],
        (4096, 256, 16): [WARP] + [stream(v) for v in (4, 8, 16)],
        (1024, 256, 16): [WARP] + [stream(v) for v in (8, 16)],
        (4096, 512, 16): [WARP] + [stream(v) for v in (8, 16, 32)],
    },
    "warps": {
        (4096, 1024, 16): [stream(8, w) for w in (1, 2, 4, 8)],
        (65536, 256, 16): [stream(1, w) for w in (1, 2, 4, 8)],
        (16384, 256, 16): [stream(2, w) for w in (1, 2, 4, 8)],
    },
    "lpt": {(T, 256, 16): [("default", {}), WARP] + [stream(v) for v in (1, 2, 4, 8)]
            for T in (8192, 16384, 65536)},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--set", choices=sorted(SETS), default="rules")
    args = ap.parse_args()
    rows = []
    for (T, N, k), cfgs in SETS[args.set].items():
        sets = [(torch.randn(T, N, device="cuda").bfloat16(), torch.randn(T, N, device="cuda").bfloat16())
                for _ in range(4)]
        ref = router_pruned(*sets[0], k)[0]
        for name, cfg in cfgs:
            if not torch.equal(pruned_router_forward(*sets[0], k, config=cfg)[0], ref):
                raise SystemExit(f"wrong scores: {(T, N, k)} {name}")
        for rep in range(args.reps):
            for name, cfg in cfgs:
                it = iter(range(10**9))
                us = triton.testing.do_bench(
                    lambda: pruned_router_forward(*sets[next(it) % 4], k, config=cfg),
                    return_mode="median") * 1e3
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for i in range(20):
                        pruned_router_forward(*sets[i % 4], k, config=cfg)
                gus = triton.testing.do_bench(g.replay, return_mode="median") * 1e3 / 20
                rows.append(dict(T=T, N=N, k=k, config=name, rep=rep, us=us, graph_us=gus))
                print(f"{T:>6} {N:>5} {k:>3} {name:>7} rep{rep}: {us:7.1f} / {gus:7.1f}", flush=True)
    with open(os.path.join(args.out, "rules_check.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                       triton=triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
