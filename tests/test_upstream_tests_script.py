"""benchmarks/upstream_tests.py on a stand-in for upstream's repository (its real tests
need CUDA): this checkout's omni_moe is the one imported even beside an ``omni_moe``
package of upstream's, the counts come from pytest's report, and a validation mismatch
that upstream's tests only print fails the run, attributed to its test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_runs_upstream_files_against_this_checkout(tmp_path):
    up = tmp_path / "upstream"
    (up / "omni_moe").mkdir(parents=True)
    (up / "omni_moe" / "__init__.py").write_text("raise ImportError('upstream package imported')\n")
    (up / "tests").mkdir()
    (up / "tests" / "testing.py").write_text(textwrap.dedent("""
        def run(ok):
            print("[validate] ok" if ok else "\\n[validate] output mismatchimpl=triton")
    """))
    (up / "tests" / "test_stand_in.py").write_text(textwrap.dedent("""
        import pytest
        import torch
        import omni_moe
        import testing
        from omni_moe.ops.triton import triton_omni_router_func

        def test_imports_ours():
            print("OMNI_MOE_AT", omni_moe.__file__)
            s, i = triton_omni_router_func(torch.zeros(2, 3), torch.zeros(2, 3), 3, 2)
            assert i.dtype == torch.int32 and s.shape == (2, 2)
            testing.run(True)

        def test_prints_a_mismatch():
            testing.run(False)

        def test_needs_cuda():
            pytest.skip("requires CUDA")
    """))
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHONPATH=ROOT, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "upstream_tests.py"),
                           str(up), "--commit", "abc123", "--", "-k", "not nothing"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert f"OMNI_MOE_AT {os.path.join(ROOT, 'omni_moe', '__init__.py')}" in log
    data = json.loads((tmp_path / "out" / "upstream_tests.json").read_text())
    assert data["upstream"]["commit"] == "abc123"
    assert {k: data["counts"][k] for k in ("passed", "skipped", "failures")} == {
        "passed": 2, "skipped": 1, "failures": 0}
    (m,) = data["mismatches"]
    assert str(m["test"]).endswith("test_stand_in.py::test_prints_a_mismatch"), m
    assert "abc123: 2 passed, 0 failed, 0 errors, 1 skipped; 1 validation mismatches" in log
