#!/usr/bin/env bash
# Device call: streaming-kernel SASS on this Triton, then correctness + timing of its
# launch variants (T = 8192, 16384, 65536; N = 256; k = 16) against the warp kernel.
export PYTHONPATH=. PYTHONUNBUFFERED=1
bash scripts/sass_hist.sh 2>&1 | grep -v nvdisasm | grep -A3 "stream_kernel" | cut -c1-300
python3 - "${OUT:-.}" <<'PY'
import json, sys, torch, triton
from omni_moe.triton.omni_router_optimized import pruned_router_forward, default_config
from omni_moe.reference import router_pruned
rows = []
for T in (8192, 16384, 65536):
    sets = [(torch.randn(T, 256, device="cuda").bfloat16(), torch.randn(T, 256, device="cuda").bfloat16()) for _ in range(4)]
    x, y = sets[0]
    ref = router_pruned(x, y, 16)[0]
    cfgs = [("default", {}), ("warp", {"kernel": "warp"})] + [
        (f"stream_lpt{l}", {"kernel": "stream", "lpt": l, "gsplit": l > 1}) for l in (1, 2, 4, 8)]
    for name, cfg in cfgs:
        s, _ = pruned_router_forward(x, y, 16, config=cfg)
        ok = torch.equal(s, ref)
        it = iter(range(10**9))
        fn = lambda: pruned_router_forward(*sets[next(it) % 4], 16, config=cfg)
        us = triton.testing.do_bench(fn, return_mode="median") * 1e3
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(20):
                pruned_router_forward(*sets[i % 4], 16, config=cfg)
        gus = triton.testing.do_bench(g.replay, return_mode="median") * 1e3 / 20
        rows.append(dict(T=T, N=256, k=16, config=name, us=us, graph_us=gus, ok=ok))
        print(rows[-1], flush=True)
json.dump(rows, open(sys.argv[1] + "/stream_check.json", "w"), indent=1)
PY
