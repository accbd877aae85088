"""examples/train_tiny_lm.py trains: a small CPU run (PyTorch paths) whose loss falls."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_tiny_lm.py")


def test_tiny_lm_loss_falls(tmp_path):
    out = tmp_path / "run.json"
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"  # the PyTorch paths: the example is about training, not kernels
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    steps = 40
    cmd = [sys.executable, SCRIPT, "--device", "cpu", "--steps", str(steps), "--d-model", "32",
           "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch-size", "8",
           "--intermediate", "64", "--experts", "64", "--topk", "4", "--warmup", "5",
           "--lr", "1e-2", "--eval-every", "20", "--eval-batches", "2", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loss floor" in proc.stdout and "PyTorch path" in proc.stdout
    res = json.loads(out.read_text())
    floor = res["loss_floor"]
    assert 0 < floor < 4.16  # below log(vocab=64): the grammar is learnable
    m = res["models"]
    assert set(m) == {"omni_moe", "dense"}
    # equal active parameters (up to rounding the dense width to an integer)
    a_moe, a_dense = m["omni_moe"]["params_active"], m["dense"]["params_active"]
    assert abs(a_moe - a_dense) <= 0.01 * a_dense
    assert m["omni_moe"]["params_total"] > a_moe
    for name, h in m.items():
        loss = h["loss"]
        assert len(loss) == steps
        first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
        assert last < first - 0.3, f"{name}: loss {first:.3f} -> {last:.3f} did not fall"
        assert len(h["eval"]) == 2 and h["eval"][-1][1] < first
