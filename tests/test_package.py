"""The package's public surface: names, entry points, and the one test command."""

import importlib
import importlib.util
import os
import re

import torch

import omni_moe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_COMMAND = "TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider -n auto --durations=15 tests"


def _read(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def test_public_router_api():
    from omni_moe.ops.router.reference import router_bruteforce
    from omni_moe.triton.omni_router import triton_omni_router_func
    from omni_moe.triton.omni_router_optimized import triton_omni_router_func_optimized

    assert "omni_router" in omni_moe.__all__
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    want, _ = router_bruteforce(x, y, 4)
    # Same signature for all three: (router_logits_x, router_logits_y, N, k).
    for fn in (omni_moe.omni_router, triton_omni_router_func, triton_omni_router_func_optimized):
        scores, indices = fn(x, y, 3, 4)
        assert torch.equal(scores, want), fn.__name__
        assert indices.dtype == torch.int32 and indices.shape == (5, 4)


def test_top_level_names():
    for name in ("omni_router", "omni_expert", "swiglu", "OmniMoE", "OmniMoEConfig", "__version__"):
        assert name in omni_moe.__all__ and getattr(omni_moe, name) is not None, name
    for name in ("omni_router", "omni_expert", "swiglu"):
        assert callable(getattr(omni_moe, name)), name


def test_version_matches_pyproject():
    m = re.search(r'^version\s*=\s*"([^"]+)"', _read("pyproject.toml"), re.M)
    assert m and omni_moe.__version__ == m.group(1)


def test_console_script_target_exists():
    m = re.search(r'^omni-moe\s*=\s*"([\w.]+):(\w+)"', _read("pyproject.toml"), re.M)
    assert m, "pyproject.toml must declare the omni-moe console script"
    assert callable(getattr(importlib.import_module(m.group(1)), m.group(2)))
    assert importlib.util.find_spec("omni_moe.__main__") is not None


def test_readme_and_ci_run_the_same_test_command():
    readme, ci = _read("README.md"), _read(".ci/run")
    assert TEST_COMMAND in readme
    for line in ("pip install -e .", "omni-moe bench router", "pip install -e '.[test]'", TEST_COMMAND):
        assert re.search(r"^" + re.escape(line) + r"$", readme, re.M), line
        assert re.search(r"^\s*" + re.escape(line) + r"$", ci, re.M), f".ci/run must run {line!r}"
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci
    assert os.access(os.path.join(REPO, ".ci", "run"), os.X_OK)


def test_readme_states_the_declared_versions():
    deps = re.search(r"^dependencies = \[(.*)\]", _read("pyproject.toml"), re.M).group(1)
    bounds = re.findall(r'"(torch[^"]*|triton[^"]*)"', deps)
    assert len(bounds) == 2
    readme = _read("README.md")
    for b in bounds:
        assert f"`{b}`" in readme, f"README must state {b}"


def test_transformers_bound_is_stated_and_ci_tests_it():
    """The hf and test extras share one transformers bound; README and docs/hf.md state
    it, and CI's oldest-versions step installs its lower end."""
    py = _read("pyproject.toml")
    hf = re.search(r'^hf = \["(transformers>=([\d.]+),<\d+)"\]', py, re.M)
    assert hf, "pyproject.toml: hf = [\"transformers>=X,<Y\"]"
    bound, low = hf.groups()
    test = re.search(r"^test = \[(.*)\]", py, re.M).group(1)
    assert f'"{bound}"' in test, "the test extra must use the hf extra's transformers bound"
    assert f"`{bound}`" in _read("README.md")
    assert bound in _read(os.path.join("docs", "hf.md"))
    ci = re.search(r"old_transformers=\$\{CI_OLD_TRANSFORMERS:-([\d.]+)\}", _read(".ci/run"))
    assert ci, ".ci/run must install the oldest supported transformers"

    def parts(v):
        return (tuple(int(x) for x in v.split(".")) + (0, 0))[:3]

    assert parts(ci.group(1)) == parts(low), (ci.group(1), low)
