"""benchmarks/expert_schedules.py runs end to end at toy sizes (--dry-run, the interpreter)."""

from __future__ import annotations

import json

import pytest

from conftest import script_module


@pytest.fixture
def script():
    yield from script_module("benchmarks/expert_schedules.py", "expert_schedules_bench")


@pytest.mark.skipif("not __import__('omni_moe.ops._dispatch', fromlist=['x']).interpret_mode()")
def test_dry_run_writes_checked_rows(script, tmp_path):
    path = tmp_path / "rows.json"
    assert script.main(["--dry-run", "--json", str(path), "--variants", "t64j64h64,t128j64h64w8",
                        "--dense-chunks", "16", "--dense-variants", "gemm-grads,bf16-gemm-grads"]) == 0
    saved = json.loads(path.read_text())
    assert "environment" in saved and len(saved["rows"]) == 1
    for row in saved["rows"]:
        assert set(row["row_dot"]) == {"t64j64h64", "t128j64h64w8"}
        for v in row["row_dot"].values():
            assert v["rel_err"] < 1e-5 and v["ms"] > 0
        for schedule in ("rows", "dense", "dense_chunk16", "dense_gemm-grads"):
            assert max(row[f"{schedule}_vs_expert_rel_l2"].values()) < 1e-5, schedule
        # bfloat16 coefficients: every result but the score gradient moves, by about 2^-9
        moved = row["dense_bf16-gemm-grads_vs_expert_rel_l2"]
        assert moved["dscores"] < 1e-5 and 1e-5 < max(moved.values()) < 1e-2, moved
        for schedule in ("expert", "rows", "dense", "dense_chunk16", "dense_gemm-grads",
                         "dense_bf16-gemm-grads"):
            assert row[schedule]["fwd_ms"] > 0 and row[schedule]["step_ms"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--schedules", "expert,token"], "--schedules"),
    (["--dense-chunks", "0"], "--dense-chunks"),
    (["--dense-chunks", "x"], "--dense-chunks"),
    (["--dense-variants", "fast"], "--dense-variants"),
])
def test_bad_arguments_exit_2(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--dry-run", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif("not __import__('omni_moe.ops._dispatch', fromlist=['x']).interpret_mode()")
def test_decode_dry_run(script, tmp_path):
    """--decode: every split checked against one chunk and against its own second call."""
    path = tmp_path / "decode.json"
    assert script.main(["--decode", "--dry-run", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["T"], r["k"]) for r in rows] == [(1, 160), (3, 40)]
    assert rows[0]["rule_split"] > 1 and rows[1]["rule_split"] == 1   # k = 40 < 128: one chunk
    for row in rows:
        assert "1" in row["splits"] and len(row["splits"]) >= 2
        for v in row["splits"].values():
            assert v["same_bits"] and v["rel_l2_vs_one_chunk"] < 1e-2 and v["eager_ms"] > 0


def test_bad_arguments(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--cases", "4096:x"])
    assert e.value.code == 2 and "--cases" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        script.main(["--variants", "nope", "--dry-run"])
    assert e.value.code == 2 and "--variants" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        script.main(["--decode", "--decode-cases", "1:600:400"])
    assert e.value.code == 2 and "--decode-cases" in capsys.readouterr().err
