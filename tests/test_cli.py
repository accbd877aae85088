"""The ``omni-moe`` command: ``bench router`` end to end on tiny cases, flags, exit codes."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

import omni_moe
from omni_moe import cli
from omni_moe.bench import router as bench_router

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def run_module(*args):
    """``python -m omni_moe ARGS`` in a fresh process (the environment is inherited)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "omni_moe", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_version():
    r = run_module("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"omni-moe {omni_moe.__version__}"


def test_bench_router_tiny_cases_write_json(tmp_path):
    out = tmp_path / "sub" / "router.json"
    cases = [(8, 4, 3), (5, 3, 9)]  # k = N*N: every pair
    r = run_module("bench", "router", "--cases", ";".join(",".join(map(str, c)) for c in cases),
                   "--json", str(out), "--warmup", "1", "--rep", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())

    assert data["benchmark"] == "router"
    assert data["mode"] == ("cuda" if HAS_CUDA else "cpu-interpret" if INTERPRET else "cpu")
    env = data["env"]
    assert env["torch"] == torch.__version__ and env["omni_moe"] == omni_moe.__version__
    assert env["date"] and ("triton" in env) and ((env["gpu"] is None) == (not HAS_CUDA))
    assert data["settings"]["dtype"] == "bf16"

    rows = data["rows"]
    by = {(r["T"], r["N"], r["k"], r["impl"]): r for r in rows}
    assert len(by) == len(rows)
    assert {(r["T"], r["N"], r["k"]) for r in rows} == set(cases)
    # Every implementation either ran on every case or is listed as skipped, with a reason.
    for impl in bench_router.IMPLS:
        ran = [c for c in cases if (*c, impl) in by]
        assert ran == cases or (not ran and data["skipped"][impl]), impl
    for impl in ("torch_pruned", "torch_brute"):
        assert all((*c, impl) in by for c in cases)
    if not (HAS_CUDA or INTERPRET):
        assert set(data["skipped"]) >= {"original", "optimized"}
        assert "NO CUDA DEVICE" in r.stdout

    for row in rows:
        T, N, k = row["T"], row["N"], row["k"]
        assert row["ok"] is True, row
        assert row["dtype"] == "bf16"
        assert row["fwd_us"] > 0 and row["bwd_us"] > 0
        floor = (2 * T * N * 2 + T * k * (2 + 4)) / 3.0e12 * 1e6
        assert row["floor_us"] == pytest.approx(floor)
        assert row["fwd_floor_frac"] == pytest.approx(floor / row["fwd_us"])
        triton_impl = bench_router.IMPLS[row["impl"]][2]
        assert (row["first_fwd_s"] is not None) == triton_impl
        orig = by.get((T, N, k, "original"))
        if orig is not None:
            assert row["fwd_speedup"] == pytest.approx(orig["fwd_us"] / row["fwd_us"])
        else:
            assert row["fwd_speedup"] is None

    # The table on stdout has one line per row.
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| T | N | k | dtype | impl | ok | fwd us | bwd us")
    assert len(table) == 1 + len(rows)


@pytest.mark.parametrize("argv", [
    [],
    ["bench"],
    ["bench", "nothing"],
    ["bench", "router", "--cases", "8,4,17"],  # k > N*N
    ["bench", "router", "--cases", "8,4"],
    ["bench", "router", "--cases", "8,0,1"],
    ["bench", "router", "--dtype", "fp8"],
    ["bench", "router", "--impls", "nope"],
    ["bench", "router", "--warmup", "x"],
    ["bench", "router", "--bogus"],
    ["--bogus"],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bad_flag_from_the_command_line():
    r = run_module("bench", "router", "--dtype", "fp8")
    assert r.returncode == 2
    assert "--dtype" in r.stderr


def test_bench_layer_missing_module_is_reported(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, cli.LAYER_MODULE, None)  # import fails
    assert cli.main(["bench", "layer", "--anything"]) == 2
    err = capsys.readouterr().err
    assert cli.LAYER_MODULE in err and "not available" in err


def test_bench_layer_delegates_to_its_module(monkeypatch):
    seen = {}
    layer = types.ModuleType(cli.LAYER_MODULE)
    layer.add_arguments = lambda p: p.add_argument("--hidden", type=int, default=8)

    def run(args):
        seen["args"] = args
        return 0

    layer.run = run
    monkeypatch.setitem(sys.modules, cli.LAYER_MODULE, layer)
    assert cli.main(["bench", "layer", "--hidden", "64"]) == 0
    assert seen["args"].hidden == 64
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "layer", "--nope"])
    assert e.value.code == 2


def test_bench_router_exits_1_when_an_implementation_is_wrong(tmp_path, monkeypatch, capsys):
    (tmp_path / "wrong_router_impl.py").write_text(
        "from omni_moe.ops.router.reference import router_pruned\n"
        "def route(x, y, k):\n"
        "    s, i = router_pruned(x, y, k)\n"
        "    return s, i.flip(1)  # indices no longer match their scores\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(bench_router.IMPLS, "wrong", ("wrong_router_impl", "route", False))
    out = tmp_path / "r.json"
    rc = cli.main(["bench", "router", "--cases", "6,4,3", "--impls", "wrong,torch_pruned",
                   "--warmup", "1", "--rep", "1", "--json", str(out)])
    assert rc == 1
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["wrong"]["ok"] is False
    assert any("does not match its index" in p for p in rows["wrong"]["problems"])
    assert rows["torch_pruned"]["ok"] is True
    assert "FAILED" in capsys.readouterr().err


def test_check_catches_contract_breaks():
    from omni_moe.ops.router.reference import router_bruteforce

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    k = 4
    s, i = router_bruteforce(x, y, k)
    grad = torch.randn(6, k, generator=g)
    from omni_moe.ops.router.reference import router_backward_reference

    dx, dy = router_backward_reference(grad, i, 5)
    assert bench_router.check(x, y, k, s, i, s, grad, dx, dy) == []
    dup = i.clone()
    dup[:, 1] = dup[:, 0]
    assert any("duplicate" in p for p in bench_router.check(x, y, k, s, dup, s, grad, dx, dy))
    assert any("range" in p for p in bench_router.check(x, y, k, s, i + 25, s, grad, dx, dy))
    assert any("reference" in p for p in bench_router.check(x, y, k, s, i, s + 1, grad, dx, dy))
    assert any("dx" in p for p in bench_router.check(x, y, k, s, i, s, grad, dx + 1, dy))
    assert any("dtype" in p for p in bench_router.check(x, y, k, s, i.long(), s, grad, dx, dy))


def test_from_json_reprints_a_saved_run(tmp_path, capsys, monkeypatch):
    import importlib.util

    row = {"T": 1024, "N": 64, "k": 16, "dtype": "bf16", "impl": "optimized", "ok": True,
           "fwd_us": 8.25, "bwd_us": 4.5, "fwd_graph_us": 3.61, "bwd_kernel_graph_us": 2.94,
           "autograd_engine_us": None, "fwd_speedup": 6.3, "bwd_speedup": None, "floor_us": 0.142,
           "fwd_floor_frac": 0.0172, "bwd_floor_frac": 0.0316, "first_fwd_s": 1.234, "first_bwd_s": None}
    saved = {"benchmark": "router", "mode": "cuda",
             "env": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0",
                     "date": "2026-11-26T10:00:00+00:00"},
             "settings": {"dtype": "bf16", "hbm_tbps": 3.0}, "rows": [row]}
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(saved))
    assert cli.main(["bench", "router", "--from-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3" in out and "2026-11-26" in out
    assert "| 1024 | 64 | 16 | bf16 | optimized | yes | 8.2 | 4.5 | 3.6 | 2.9 | - | 6.30 | - | 0.142 | 0.0172 | 0.0316 | 1.23 | - |" in out

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    png = tmp_path / "r.png"
    assert cli.main(["bench", "router", "--from-json", str(path), "--plot", str(png)]) == 2
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not png.exists()


def test_noop_router_graph_is_a_kernel_free_control():
    """The autograd-engine control of `bench router`: zero gradients of the right shapes."""
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    s, leaves = bench_router.noop_router_graph(x, y, 3)
    assert s.shape == (5, 3) and s.requires_grad
    dx, dy = torch.autograd.grad(s, leaves, torch.ones(5, 3), retain_graph=True)
    assert torch.equal(dx, torch.zeros(5, 8)) and torch.equal(dy, torch.zeros(5, 8))
