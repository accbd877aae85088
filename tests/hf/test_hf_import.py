"""`import omni_moe` must not import transformers (it is an optional extra)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_import_omni_moe_leaves_transformers_out():
    code = ("import sys, omni_moe, omni_moe.modules, omni_moe.layers, omni_moe.layers.reference; "
            "assert 'transformers' not in sys.modules, 'transformers imported'; print('ok')")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_hf_extra_declared():
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    assert 'hf = ["transformers>=' in text
