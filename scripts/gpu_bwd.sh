#!/bin/bash
# Device run: backward experiment + forward register/CTA sweep.  Writes under $OUT.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
python3 scripts/bwd_experiment.py "$OUT" > "$OUT/bwd.txt" 2>&1
grep -v "^{" "$OUT/bwd.txt" | tail -140
python3 scripts/tune_router.py --out "$OUT" --plan regs --budget 230 > "$OUT/tune.txt" 2>&1
tail -90 "$OUT/tune.txt"
