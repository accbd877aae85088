#!/usr/bin/env bash
# One device call: router tests on the GPU, a T = 8192 launch-rule check, the router
# benchmark; everything written under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
date -u +%FT%TZ | tee -a "$OUT/env.txt"
xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n 8"

python3 -m pytest -q -p no:cacheprovider $xdist -k "not compile" \
    tests/test_router_optimized.py tests/test_router.py > "$OUT/pytest_router.txt" 2>&1
rc=$?; tail -n 25 "$OUT/pytest_router.txt"; echo "router tests rc=$rc"

if [[ "${LPT_CHECK:-0}" == 1 ]]; then
python3 - "$OUT" <<'PY' 2>&1 | tee "$OUT/lpt8192.txt"
import json, sys, torch, triton
from omni_moe.triton.omni_router_optimized import pruned_router_forward, default_config
from omni_moe.reference import router_pruned
rows = []
for T in (8192, 16384):
    x = torch.randn(T, 256, device="cuda").bfloat16(); y = torch.randn_like(x)
    ref = router_pruned(x, y, 16)[0]
    cfgs = [("default", {}), ("warp", {"kernel": "warp"})] + [
        (f"stream_lpt{l}", {"kernel": "stream", "lpt": l, "gsplit": l > 1}) for l in (1, 2, 4, 8, 16)]
    for name, cfg in cfgs:
        s, _ = pruned_router_forward(x, y, 16, config=cfg)
        ok = torch.equal(s, ref)
        us = triton.testing.do_bench(lambda: pruned_router_forward(x, y, 16, config=cfg), return_mode="median") * 1e3
        rows.append(dict(T=T, N=256, k=16, config=name, us=us, ok=ok))
        print(rows[-1], flush=True)
print("default:", default_config(8192, 256, 16, torch.bfloat16), default_config(16384, 256, 16, torch.bfloat16))
json.dump(rows, open(sys.argv[1] + "/lpt8192.json", "w"), indent=1)
PY
fi

python3 -m omni_moe bench router --json "$OUT/router.json" --plot "$OUT/router.png" \
    2> "$OUT/bench_router.err" > "$OUT/bench_router.txt"
echo "bench router rc=$?"; tail -n 20 "$OUT/bench_router.txt"
