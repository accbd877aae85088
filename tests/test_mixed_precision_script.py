"""benchmarks/mixed_precision.py --dry: every recipe x router norm x gradient layout runs
a few checked training steps on CPU, and the JSON holds the rows and the versions."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys


def test_dry_run(tmp_path):
    root = os.path.join(os.path.dirname(__file__), "..")
    env = dict(os.environ, PYTHONPATH=root, OUT=str(tmp_path), TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "mixed_precision.py"),
                           "--dry"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "mixed_precision.json").read_text())
    assert data["meta"]["dry"] and "torch" in data["meta"]
    rows = data["layer"]
    assert {(r["norm"], r["grads"], r["recipe"]) for r in rows} == {
        (n, g, r) for n in ("batchnorm", "layernorm", "none") for g in ("dense", "sparse")
        for r in ("bf16", "amp-bf16", "amp-bf16-tables", "amp-fp16")}
    assert all(r["ok"] and r["loss_last"] < r["loss_first"] for r in rows)
    if importlib.util.find_spec("transformers") and importlib.util.find_spec("accelerate"):
        (trainer,) = data["trainer"]
        assert trainer["precision"] == "bf16" and trainer["ok"] and trainer["weights"] == "torch.float32"
