"""The transformers examples run end to end at tiny sizes (in-process, PyTorch path)."""

import os
import sys

import pytest

from conftest import REPO, script_module

pytest.importorskip("transformers")


@pytest.fixture
def convert_llama():
    yield from script_module("examples/convert_llama.py", "convert_llama")


@pytest.fixture
def train_hf_lm():
    yield from script_module("examples/train_hf_lm.py", "train_hf_lm")


@pytest.fixture
def hf_model():
    yield from script_module("benchmarks/hf_model.py", "hf_model")


pytestmark = pytest.mark.usefixtures("torch_path")


def test_convert_llama_from_dir(convert_llama, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4))
    dense.save_pretrained(tmp_path / "dense")
    rc = convert_llama.main(["--model-dir", str(tmp_path / "dense"), "--out", str(tmp_path / "omni"),
                             "--num-experts", "16", "--k", "3", "--layers", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "1/2 MLPs" in out and "= 0" in out and "identical: True" in out
    assert convert_llama.main(["--out", str(tmp_path / "x"), "--num-experts", "15"]) == 2
    assert "num_experts" in capsys.readouterr().err


def test_train_hf_lm_tiny(train_hf_lm, tmp_path, capsys):
    rc = train_hf_lm.main(["--steps", "8", "--hidden", "32", "--layers", "1", "--heads", "2", "--experts", "16",
                           "--k", "2", "--seq", "32", "--batch", "4", "--log-every", "4", "--sample", "8",
                           "--save", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [l for l in out.splitlines() if l.startswith("step")]
    assert len(lines) == 2 and "experts used (layer 0)" in lines[0]
    first, last = (float(l.split()[3]) for l in (lines[0], lines[-1]))
    assert last < first
    assert os.path.exists(tmp_path / "m" / "config.json")
    assert train_hf_lm.main(["--text", str(tmp_path / "missing.txt")]) == 2


HF_TINY = ["--steps", "6", "--hidden", "32", "--layers", "2", "--heads", "2", "--experts", "16", "--k", "2",
           "--seq", "32", "--batch", "4", "--log-every", "2", "--sample", "4", "--aux-coef", "0",
           "--router-norm", "batchnorm", "--device", "cpu"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_train_hf_lm_under_torchrun_matches_one_process(parallel, tmp_path):
    """``torchrun --nproc-per-node 2 examples/train_hf_lm.py --parallel ddp|fsdp`` (gloo):
    the same logged losses as one process on the whole batch (synchronised router
    statistics, no load-balancing loss), and the saved model (FSDP2: gathered to rank 0)
    holds the same weights."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = os.path.join(REPO, "examples", "train_hf_lm.py")
    env = dict(os.environ, PYTHONPATH=REPO, TRITON_INTERPRET="0")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, script, *HF_TINY, "--json", str(one) + ".json", "--save", str(one)],
                   env=env, check=True, capture_output=True, timeout=300)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          script, *HF_TINY, "--parallel", parallel, "--json", str(two) + ".json",
                          "--save", str(two)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("step ") == 3   # rank 0 alone prints
    a, b = (json.loads(open(str(d) + ".json").read()) for d in (one, two))
    assert a["step"] == b["step"] == [2, 4, 6]
    for key in ("train", "val"):
        assert max(abs(x - y) for x, y in zip(a[key], b[key])) < 1e-5, (key, a[key], b[key])
    wa, wb = (load_file(str(d / "model.safetensors")) for d in (one, two))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() <= 1e-5 * (1 + wa[name].abs().max()), name


def test_train_hf_lm_parallel_needs_torchrun(train_hf_lm, capsys):
    assert train_hf_lm.main([*HF_TINY, "--parallel", "ddp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torchrun" in err


def test_benchmark_script_tiny(hf_model, tmp_path, capsys):
    import json

    path = tmp_path / "b.json"
    assert hf_model.main(["--tiny", "--steps", "1", "--dtype", "float32", "--json", str(path)]) == 0
    res = json.loads(path.read_text())["results"]
    assert set(res) == {"dense", "converted", "native"}
    assert all(r["tokens_per_s"] > 0 for r in res.values())
    # the converted model starts as the dense one
    assert abs(res["converted"]["first_loss"] - res["dense"]["first_loss"]) < 1e-5
    assert hf_model.main(["--tiny", "--json", str(path), "--models", "sparse"]) == 2
    # errors name the option typed
    capsys.readouterr()
    for bad, option in ((["--k", "99999"], "--k must be in"), (["--experts", "20"], "--experts must be"),
                        (["--native-norm", "rms"], "--native-norm must be one of")):
        assert hf_model.main(["--tiny", "--json", str(path), *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and option in err, err


def test_benchmark_script_tiny_prints_without_json(hf_model, capsys):
    assert hf_model.main(["--tiny", "--steps", "1", "--warmup", "0", "--models", "dense"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("dense ")]
    assert len(rows) == 1 and "tok/s" in rows[0] and "wrote" not in out
