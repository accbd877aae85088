"""examples/train_tiny_lm.py trains: its --quick CPU run (PyTorch paths) whose loss falls."""

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
    cmd = [sys.executable, SCRIPT, "--quick", "--device", "cpu", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loss floor" in proc.stdout and "PyTorch path" in proc.stdout
    # the held-out losses reach the terminal, not only the JSON
    assert [ln.split(":")[0] for ln in proc.stdout.splitlines() if "eval loss omni_moe" in ln] == \
        ["step 20", "step 40", "step 60"]
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
        assert len(loss) == res["args"]["steps"] == 60
        first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
        assert last < first - 0.3, f"{name}: loss {first:.3f} -> {last:.3f} did not fall"
        assert [e[0] for e in h["eval"]] == [20, 40, 60] and h["eval"][-1][1] < first
