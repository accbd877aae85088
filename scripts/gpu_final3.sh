#!/usr/bin/env bash
# One device call: every test on the GPU, then the layer benchmark; under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.txt"
date -u +%FT%TZ | tee -a "$OUT/env.txt"
xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
python3 -m pytest -q -p no:cacheprovider $xdist -k "not compile" tests > "$OUT/pytest_all.txt" 2>&1
echo "all tests rc=$?"; grep -v Warning "$OUT/pytest_all.txt" | tail -n 15
python3 -m omni_moe bench layer --json "$OUT/layer.json" > "$OUT/bench_layer.txt" 2>&1
echo "bench layer rc=$?"; tail -n 30 "$OUT/bench_layer.txt"
