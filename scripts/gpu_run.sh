#!/usr/bin/env bash
# One device call (device tool: `bash scripts/gpu_run.sh STEP...`); results under $OUT.
#   tests   every test on the GPU (pytest-xdist if installed; torch.compile tests skipped)
#   router  omni-moe bench router, then twice more for the optimized router alone
#   layer   omni-moe bench layer
#   rules   scripts/router_rules_check.py (launch rules of the pruned router)
#   sass    scripts/sass_hist.sh (opcode histograms of the router kernels)
# Steps run in the order given; e.g. `bash scripts/gpu_run.sh tests router`.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
date -u +%FT%TZ | tee -a "$OUT/env.txt"
xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
for step in "$@"; do
  case "$step" in
    tests)
      python3 -m pytest -q -p no:cacheprovider $xdist -k "not compile" tests > "$OUT/pytest.txt" 2>&1
      echo "tests rc=$?"; grep -E "passed|failed|error" "$OUT/pytest.txt" | tail -3 ;;
    router)
      python3 -m omni_moe bench router --json "$OUT/router.json" --plot "$OUT/router.png" \
          2> "$OUT/bench_router.err" > "$OUT/bench_router.txt"
      echo "bench router rc=$?"
      for i in 1 2; do
        python3 -m omni_moe bench router --impls optimized --reuse-triton-cache \
            > "$OUT/router_opt_$i.txt" 2>&1
        echo "rep $i rc=$?"
      done
      grep -h "optimized | yes" "$OUT/bench_router.txt" "$OUT"/router_opt_*.txt | cut -c1-160 ;;
    layer)
      python3 -m omni_moe bench layer --json "$OUT/layer.json" > "$OUT/bench_layer.txt" 2>&1
      echo "bench layer rc=$?"; tail -n 8 "$OUT/bench_layer.txt" ;;
    rules)
      python3 scripts/router_rules_check.py "$OUT" ;;
    sass)
      bash scripts/sass_hist.sh | grep -v nvdisasm ;;
    *)
      echo "unknown step: $step" >&2; exit 2 ;;
  esac
done
