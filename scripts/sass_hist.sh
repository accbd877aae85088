#!/usr/bin/env bash
# Compile the router kernels for a few launch configurations in a fresh Triton cache and
# print each cubin's opcode histogram (cuobjdump -sass).  Device-side static analysis.
export PYTHONPATH=. TRITON_CACHE_DIR=$(mktemp -d)
python3 - <<'PY'
import torch
from omni_moe.triton.omni_router_optimized import pruned_router_forward
from omni_moe.triton.router_backward import router_backward
x = torch.randn(16384, 256, device="cuda").bfloat16(); y = torch.randn_like(x)
for cfg in ({"kernel": "stream", "lpt": 1}, {"kernel": "stream", "lpt": 2, "gsplit": True}):
    s, i = pruned_router_forward(x, y, 16, config=cfg)
router_backward(s, i, 256)
torch.cuda.synchronize()
PY
for f in $(find $TRITON_CACHE_DIR -name "*.cubin"); do
  echo "== $(basename $f)"
  python3 scripts/sass_loops.py $f
  g=${f%.cubin}.ttgir
  grep -E "^#blocked|^#linear" $g | head -12
  grep -cE "convert_layout" $g
  grep -E "tt.load" $g | head -2
done
