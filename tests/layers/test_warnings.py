"""No warning escapes the library: the layer's forward and backward in every mode (router
norm, dense and sparse expert gradients, training and eval, float32 and bf16) on the
PyTorch path and through the kernels, with every warning turned into an error.

Each path runs in a fresh process: torch raises some of its warnings once per process
(``TORCH_WARN_ONCE``, e.g. "Sparse invariant checks are implicitly disabled"), so in the
test process an earlier test could have spent them.  The interpreter path needs its own
process anyway (Triton fixes the mode when the kernel modules are imported).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import omni_moe

from conftest import HAS_CUDA

SCRIPT = r"""
import itertools, sys, warnings
import torch, triton  # their own import-time warnings are not the library's

warnings.simplefilter("error")
import omni_moe
from omni_moe import OmniMoE, OmniMoEConfig
from omni_moe.optim import clip_grad_norm_

assert omni_moe.__file__ == sys.argv[2], (omni_moe.__file__, sys.argv[2])
device = sys.argv[1]
runs = 0
for norm, sparse, training in itertools.product(
        ("batchnorm", "layernorm", "none"), (False, True), (True, False)):
    torch.manual_seed(runs)
    layer = OmniMoE(OmniMoEConfig(16, 24, "silu", 36, 3, router_norm=norm,
                                  sparse_expert_grad=sparse)).to(device)
    layer.train(training)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    # Two steps: float32 with flat input, then bf16 with batched input.
    for dtype, shape in ((torch.float32, (10, 16)), (torch.bfloat16, (2, 5, 16))):
        layer.to(dtype)
        h = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        layer(h).float().square().mean().backward()
        clip_grad_norm_(layer.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        runs += 1
print("runs", runs)
"""


def run_probe(interpret: bool, device: str):
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1" if interpret else "0"
    root = os.path.dirname(os.path.dirname(omni_moe.__file__))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", SCRIPT, device, omni_moe.__file__],
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("interpret", [False, True], ids=["torch-path", "interpreter"])
def test_layer_raises_no_warning(interpret):
    """Every mode's forward, backward, gradient clipping and optimizer step with
    warnings as errors."""
    proc = run_probe(interpret, "cpu")
    assert proc.returncode == 0, f"a warning or error escaped:\n{proc.stderr[-3000:]}"
    assert "runs 24" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_layer_raises_no_warning_cuda():
    proc = run_probe(False, "cuda")
    assert proc.returncode == 0, f"a warning or error escaped:\n{proc.stderr[-3000:]}"
    assert "runs 24" in proc.stdout
