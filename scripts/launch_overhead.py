"""Host cost of one Triton launch on this machine (not library code).

Per-call wall time of 2000 back-to-back launches of an empty kernel with 1, 8 and 24
runtime integer arguments (plus 4 constexprs), and of the router's two launchers with
preallocated outputs, for comparison with `scripts/host_overhead.py`.

    PYTHONPATH=. python3 scripts/launch_overhead.py
"""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_overhead import per_call_us  # noqa: E402


@triton.jit
def _k1(P, a0, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    pass


@triton.jit
def _k8(P, a0, a1, a2, a3, a4, a5, a6, a7,
        C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    pass


@triton.jit
def _k24(P, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
         a16, a17, a18, a19, a20, a21, a22, a23,
         C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    pass


def main():
    p = torch.empty(16, device="cuda")
    c = dict(C0=1, C1=2, C2=3, C3=4)
    ints = [3 + 16 * i for i in range(24)]
    print(f"empty kernel,  1 int arg : {per_call_us(lambda: _k1[(1,)](p, 5, **c)):6.1f} us")
    print(f"empty kernel,  8 int args: {per_call_us(lambda: _k8[(1,)](p, *ints[:8], **c)):6.1f} us")
    print(f"empty kernel, 24 int args: {per_call_us(lambda: _k24[(1,)](p, *ints, **c)):6.1f} us")
    print(f"torch.empty(16)          : {per_call_us(lambda: torch.empty(16, device='cuda')):6.1f} us")
    print(f"p.add_(1)                : {per_call_us(lambda: p.add_(1)):6.1f} us")


if __name__ == "__main__":
    main()
