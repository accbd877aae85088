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


def _resolve(dotted):
    """The object a dotted name ``omni_moe.a.b.C`` names: the longest importable module
    prefix, then attributes."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_docs_hf_names_are_importable():
    """Every omni_moe name docs/hf.md shows is importable from where it says: dotted
    paths, ``from omni_moe... import`` lists, ``alias.name`` after ``import ... as alias``,
    and each bare class name (``OmniMoEQwen2ForCausalLM``) from ``omni_moe.hf`` (or, for
    the layer's own classes, ``omni_moe``)."""
    import re

    import pytest

    pytest.importorskip("transformers")
    import omni_moe
    import omni_moe.hf

    with open(os.path.join(REPO, "docs", "hf.md"), encoding="utf-8") as f:
        text = f.read()
    dotted = set(re.findall(r"\bomni_moe(?:\.\w+)+", text))
    for name in dotted:
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            raise AssertionError(f"docs/hf.md names {name}, which does not import: {e}") from None
    for mod, names in re.findall(r"from (omni_moe[\w.]*) import \(?([\w, \n]+)\)?", text):
        for n in filter(None, (s.strip() for s in names.split(","))):
            assert hasattr(_resolve(mod), n), f"docs/hf.md: from {mod} import {n}"
    aliases = dict((a, m) for m, a in re.findall(r"import (omni_moe[\w.]*) as (\w+)", text))
    assert aliases, "docs/hf.md's examples import omni_moe.hf under an alias"
    for alias, mod in aliases.items():
        for n in set(re.findall(rf"\b{alias}\.(\w+)", text)):
            assert hasattr(_resolve(mod), n), f"docs/hf.md: {alias}.{n} ({mod}.{n})"
    qualified = {d.rsplit(".", 1)[-1] for d in dotted}
    classes = set(re.findall(r"\b(OmniMoE\w*|RouterLogitsProbe|ExpertUsage)\b", text))
    assert {"OmniMoEQwen2ForCausalLM", "OmniMoEMistralConfig", "OmniMoEQwen3Model"} <= classes
    for n in classes - qualified:
        assert hasattr(omni_moe.hf, n) or n in omni_moe.__all__, \
            f"docs/hf.md names {n}, which neither omni_moe.hf nor omni_moe exports"
    for n in omni_moe.hf.__all__:
        obj = getattr(omni_moe.hf, n)
        if isinstance(obj, type):  # pickle and copy find classes by module and name
            assert getattr(sys.modules[obj.__module__], obj.__qualname__) is obj, n
