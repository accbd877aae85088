"""The transformers examples run end to end at tiny sizes (in-process, PyTorch path)."""

import importlib.util
import os

import pytest

pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "examples", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_convert_llama_from_dir(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4))
    dense.save_pretrained(tmp_path / "dense")
    mod = _load("convert_llama")
    rc = mod.main(["--model-dir", str(tmp_path / "dense"), "--out", str(tmp_path / "omni"),
                   "--num-experts", "16", "--k", "3", "--layers", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "1/2 MLPs" in out and "= 0" in out and "identical: True" in out
    assert mod.main(["--out", str(tmp_path / "x"), "--num-experts", "15"]) == 2
    assert "num_experts" in capsys.readouterr().err


def test_train_hf_lm_tiny(tmp_path, capsys):
    mod = _load("train_hf_lm")
    rc = mod.main(["--steps", "8", "--hidden", "32", "--layers", "1", "--heads", "2", "--experts", "16",
                   "--k", "2", "--seq", "32", "--batch", "4", "--log-every", "4", "--sample", "8",
                   "--save", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [l for l in out.splitlines() if l.startswith("step")]
    assert len(lines) == 2 and "experts used (layer 0)" in lines[0]
    first, last = (float(l.split()[3]) for l in (lines[0], lines[-1]))
    assert last < first
    assert os.path.exists(tmp_path / "m" / "config.json")
    assert mod.main(["--text", str(tmp_path / "missing.txt")]) == 2


def test_benchmark_script_tiny(tmp_path):
    import json

    spec = importlib.util.spec_from_file_location("hf_model", os.path.join(REPO, "benchmarks", "hf_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path / "b.json"
    assert mod.main(["--tiny", "--steps", "1", "--dtype", "float32", "--json", str(path)]) == 0
    res = json.loads(path.read_text())["results"]
    assert set(res) == {"dense", "converted", "native"}
    assert all(r["tokens_per_s"] > 0 for r in res.values())
    # the converted model starts as the dense one
    assert abs(res["converted"]["first_loss"] - res["dense"]["first_loss"]) < 1e-5
    assert mod.main(["--tiny", "--json", str(path), "--models", "sparse"]) == 2
