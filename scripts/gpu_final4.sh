#!/usr/bin/env bash
# Final device call: router tests on the GPU, the router benchmark, then two repetitions
# of the optimized router alone (for the spread of eager medians); under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-out}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.txt"
date -u +%FT%TZ | tee -a "$OUT/env.txt"
python3 -m pytest -q -p no:cacheprovider -n 8 -k "not compile" \
    tests/test_router_optimized.py tests/test_router.py tests/test_moe.py > "$OUT/pytest_router.txt" 2>&1
echo "tests rc=$?"; grep -E "passed|failed" "$OUT/pytest_router.txt" | tail -2
python3 -m omni_moe bench router --json "$OUT/router.json" --plot "$OUT/router.png" \
    2> "$OUT/bench_router.err" > "$OUT/bench_router.txt"
echo "bench router rc=$?"
for i in 1 2; do
  python3 -m omni_moe bench router --impls optimized --reuse-triton-cache --json "$OUT/router_opt_$i.json" > "$OUT/opt_$i.txt" 2>&1
  echo "rep $i rc=$?"
done
grep "optimized | yes" "$OUT/bench_router.txt" "$OUT"/opt_*.txt | cut -c1-160
