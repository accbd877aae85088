#!/usr/bin/env bash
# Device call: launch-rule checks for the streaming kernel after the layout fix (bf16,
# do_bench median over 4 rotating input sets, and CUDA-graph per-call time); each
# configuration measured 3 times, interleaved.
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 - "${OUT:-.}" <<'PY'
import json, sys, torch, triton
from omni_moe.triton.omni_router_optimized import pruned_router_forward
from omni_moe.reference import router_pruned
cases = {
    (65536, 256, 16): [("lpt1", {"kernel": "stream", "lpt": 1}), ("lpt2", {"kernel": "stream", "lpt": 2, "gsplit": True})],
    (32768, 256, 16): [("lpt1", {"kernel": "stream", "lpt": 1}), ("lpt2", {"kernel": "stream", "lpt": 2, "gsplit": True})],
    (4096, 1024, 16): [("warp", {"kernel": "warp"})] + [(f"lpt{l}", {"kernel": "stream", "lpt": l, "gsplit": True}) for l in (4, 8, 16, 32)],
    (4096, 256, 16): [("warp", {"kernel": "warp"})] + [(f"lpt{l}", {"kernel": "stream", "lpt": l, "gsplit": True}) for l in (4, 8, 16)],
    (1024, 256, 16): [("warp", {"kernel": "warp"})] + [(f"lpt{l}", {"kernel": "stream", "lpt": l, "gsplit": True}) for l in (8, 16)],
    (4096, 512, 16): [("warp", {"kernel": "warp"})] + [(f"lpt{l}", {"kernel": "stream", "lpt": l, "gsplit": True}) for l in (8, 16, 32)],
}
rows = []
for (T, N, k), cfgs in cases.items():
    sets = [(torch.randn(T, N, device="cuda").bfloat16(), torch.randn(T, N, device="cuda").bfloat16()) for _ in range(4)]
    ref = router_pruned(*sets[0], k)[0]
    for name, cfg in cfgs:
        assert torch.equal(pruned_router_forward(*sets[0], k, config=cfg)[0], ref), (T, N, k, name)
    for rep in range(3):
        for name, cfg in cfgs:
            it = iter(range(10**9))
            us = triton.testing.do_bench(lambda: pruned_router_forward(*sets[next(it) % 4], k, config=cfg), return_mode="median") * 1e3
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(20):
                    pruned_router_forward(*sets[i % 4], k, config=cfg)
            gus = triton.testing.do_bench(g.replay, return_mode="median") * 1e3 / 20
            rows.append(dict(T=T, N=N, k=k, config=name, rep=rep, us=us, graph_us=gus))
            print(f"{T:>6} {N:>5} {k:>3} {name:>6} rep{rep}: {us:7.1f} / {gus:7.1f}", flush=True)
json.dump(rows, open(sys.argv[1] + "/rules_check.json", "w"), indent=1)
PY
