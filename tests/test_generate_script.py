"""benchmarks/generate.py: the --tiny run end to end (PyTorch paths, TRITON_INTERPRET off),
the matched active parameters, and bad options (one line on stderr, exit 2)."""

import json
import math

import pytest
import torch

from conftest import script_module

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def g():
    yield from script_module("benchmarks/generate.py", "generate_bench")


def test_tiny_run(g, tmp_path, capsys, torch_path):
    path = tmp_path / "gen.json"
    assert g.main(["--tiny", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    rows = res["rows"]
    assert res["benchmark"] == "generate" and res["env"]["torch"] == torch.__version__
    # every model x mode x batch, each with a positive throughput
    assert {(r["model"], r["mode"], r["batch"]) for r in rows} == {
        (m, mode, b) for m in ("dense", "omnimoe", "converted") for mode in ("dynamic", "static") for b in (1, 4)}
    assert all(r["tokens_per_s"] > 0 and r["generate_s"] > 0 and r["decode_step_ms"] >= 0 for r in rows)
    # float32 on the CPU: the static cache generates the dynamic cache's tokens
    for r in rows:
        if r["batch"] == 1:
            assert r["agree_with_dynamic"] == 1.0, r
    # the native OmniMoE model has the dense model's active FFN parameters; the converted
    # one keeps the dense MLP and adds the router and K experts
    act = {r["model"]: r["active_ffn_params"] for r in rows}
    n = math.isqrt(256)
    k = (3 * (192 - 128) - 2 * n) // 2
    assert act["omnimoe"] == act["dense"] == 3 * 64 * 192
    assert act["converted"] == act["dense"] + 2 * n * 64 + 2 * k * 64
    out = capsys.readouterr().out
    assert "| omnimoe | static | 4 |" in out and "wrote" in out


def test_generated_tokens_match_the_model(g, torch_path):
    """What the script times is the model's greedy continuation: the static-cache call
    reproduces a step-by-step argmax of the full forward."""
    args = g.parse_args(["--tiny"])
    model = g.build("omnimoe", args, torch.float32, torch.device("cpu"))
    x = torch.randint(1, args.vocab, (2, args.prompt), generator=torch.Generator().manual_seed(3))
    out = g.generate(model, x, 4, "static")
    seq = x
    with torch.inference_mode():
        for _ in range(4):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("argv,word", [
    (["--tiny", "--experts", "300"], "perfect square"),
    (["--tiny", "--batches", "0"], "--batches"),
    (["--tiny", "--models", "dense,moe"], "--models"),
    (["--tiny", "--new", "1"], "--new"),
    (["--tiny", "--hidden", "30"], "--heads"),
    (["--tiny", "--dense-width", "130"], "--k"),
])
def test_bad_options_one_line_exit_2(g, capsys, argv, word):
    with pytest.raises(SystemExit) as e:
        g.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and word in err, err
