#!/usr/bin/env bash
# One device call: GPU test suite, then the router and layer benchmarks and the training
# example, everything written under $OUT.  Usage (device tool): bash scripts/gpu_final.sh [tests|bench|all]
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-out}
mkdir -p "$OUT"
what=${1:-all}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
date -u +%FT%TZ | tee -a "$OUT/env.txt"
if [[ $what == tests || $what == all ]]; then
  xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
  timeout 300 python3 -m pytest -q -p no:cacheprovider $xdist tests 2>&1 | tail -n 40 | tee "$OUT/pytest.txt"
fi
if [[ $what == bench || $what == all ]]; then
  timeout 330 python3 -m omni_moe bench router --json "$OUT/router.json" --plot "$OUT/router.png" \
      2> "$OUT/bench_router.err" | tee "$OUT/bench_router.txt"
  timeout 200 python3 -m omni_moe bench layer --json "$OUT/layer.json" 2>&1 | tee "$OUT/bench_layer.txt"
fi
