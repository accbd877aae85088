"""The ``omni-moe`` command: both benchmarks end to end on tiny cases, flags, one-line errors."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import omni_moe
from omni_moe import cli
from omni_moe.bench import common as bench_common
from omni_moe.bench import layer as bench_layer
from omni_moe.bench import router as bench_router

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def run_module(*args):
    """``python -m omni_moe ARGS`` in a fresh process (the environment is inherited)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "omni_moe", *args], capture_output=True,
                          text=True, env=env)


def test_version():
    r = run_module("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"omni-moe {omni_moe.__version__}"


def test_bench_router_tiny_cases_write_json(tmp_path):
    out = tmp_path / "sub" / "router.json"
    cases = [(8, 4, 3), (5, 3, 9)]  # k = N*N: every pair
    r = run_module("bench", "router", "--cases", ";".join(",".join(map(str, c)) for c in cases),
                   "--json", str(out), "--warmup-ms", "1", "--rep-ms", "1")
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
    ["bench", "router", "--warmup-ms", "x"],
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
                   "--warmup-ms", "1", "--rep-ms", "1", "--json", str(out)])
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


def _hide_matplotlib(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))


def test_from_json_reprints_a_saved_run(tmp_path, capsys, monkeypatch):
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
    # (the saved run predates the atomic-backward column: "-" after 2.9)
    assert "| 1024 | 64 | 16 | bf16 | optimized | yes | 8.2 | 4.5 | 3.6 | 2.9 | - | - | 6.30 | - | 0.142 | 0.0172 | 0.0316 | 1.23 | - |" in out

    _hide_matplotlib(monkeypatch)
    png = tmp_path / "r.png"
    assert cli.main(["bench", "router", "--from-json", str(path), "--plot", str(png)]) == 2
    err = capsys.readouterr().err
    assert "matplotlib, which is not installed" in err and err.count("\n") == 1
    assert not png.exists()


def test_noop_router_graph_is_a_kernel_free_control():
    """The autograd-engine control of `bench router`: zero gradients of the right shapes."""
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    s, leaves = bench_router.noop_router_graph(x, y, 3)
    assert s.shape == (5, 3) and s.requires_grad
    dx, dy = torch.autograd.grad(s, leaves, torch.ones(5, 3), retain_graph=True)
    assert torch.equal(dx, torch.zeros(5, 8)) and torch.equal(dy, torch.zeros(5, 8))


# --------------------------------------------------------------------------- user errors
def run_main(argv, capsys):
    """(exit status, stderr) of ``omni-moe ARGV`` run in this process."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_line_error(rc, err, *words):
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("omni-moe"), err
    for w in words:
        assert w in err, (w, err)


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if a benchmark starts measuring anything."""
    def boom(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(bench_layer, "run_case", boom)
    monkeypatch.setattr(bench_router, "_bench_impl", boom)
    monkeypatch.setattr(bench_common, "environment", boom)


BENCHES = ("router", "layer")


@pytest.mark.parametrize("bench", BENCHES)
def test_from_json_missing_file(bench, tmp_path, capsys, no_work):
    rc, err = run_main(["bench", bench, "--from-json", str(tmp_path / "none.json")], capsys)
    assert_one_line_error(rc, err, "--from-json", "no such file")


@pytest.mark.parametrize("bench", BENCHES)
def test_from_json_not_json(bench, tmp_path, capsys, no_work):
    path = tmp_path / "x.json"
    path.write_text("T,N,k\n1,2,3\n")
    rc, err = run_main(["bench", bench, "--from-json", str(path)], capsys)
    assert_one_line_error(rc, err, "not a JSON file")
    path.write_bytes(b"\xff\xfe\x00garbage")
    rc, err = run_main(["bench", bench, "--from-json", str(path)], capsys)
    assert_one_line_error(rc, err, "not a JSON file")


@pytest.mark.parametrize("bench", BENCHES)
@pytest.mark.parametrize("content", [
    [], {"rows": 3}, {"benchmark": "router", "rows": [1]}, {"benchmark": "nothing", "rows": []},
    {"benchmark": "layer", "rows": [{"T": 1}]},
    {"benchmark": "router", "mode": "cuda", "env": {}, "settings": {}, "rows": [{"T": 1}]},
])
def test_from_json_wrong_schema(bench, content, tmp_path, capsys, no_work):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(content))
    rc, err = run_main(["bench", bench, "--from-json", str(path)], capsys)
    assert_one_line_error(rc, err, f"not a file written by 'omni-moe bench {bench} --json'")


@pytest.mark.parametrize("bench", BENCHES)
def test_from_json_other_benchmarks_file(bench, tmp_path, capsys, no_work):
    """A router file given to the layer and vice versa."""
    other = {"router": "layer", "layer": "router"}[bench]
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"benchmark": other, "mode": "cpu", "env": {}, "settings": {},
                                "rows": [{"T": 1, "N": 2, "k": 1, "impl": "x", "hidden": 1,
                                          "intermediate": 1, "experts": 1}]}))
    rc, err = run_main(["bench", bench, "--from-json", str(path)], capsys)
    assert_one_line_error(rc, err, "not a file written by")


@pytest.mark.parametrize("bench", BENCHES)
def test_from_json_bad_row_content(bench, tmp_path, capsys):
    path = tmp_path / "x.json"
    row = {"T": 1, "N": 2, "k": 1, "impl": "x", "dtype": "bf16", "hidden": 1, "intermediate": 1,
           "experts": 1, "times_ms": 5, "fwd_us": "fast"}
    path.write_text(json.dumps({"benchmark": bench, "mode": "cpu", "env": {"gpu": None}, "settings": {},
                                "rows": [row]}))
    rc, err = run_main(["bench", bench, "--from-json", str(path)], capsys)
    assert_one_line_error(rc, err, "unexpected content")


@pytest.mark.parametrize("bench", BENCHES)
@pytest.mark.parametrize("where", ["dir", "under_a_file"])
def test_unwritable_json_fails_before_any_work(bench, where, tmp_path, capsys, no_work):
    (tmp_path / "f").write_text("")
    path = tmp_path if where == "dir" else tmp_path / "f" / "out.json"
    rc, err = run_main(["bench", bench, "--json", str(path)], capsys)
    assert_one_line_error(rc, err, "--json", str(path))


@pytest.mark.parametrize("bench", BENCHES)
def test_plot_without_matplotlib_fails_before_any_work(bench, tmp_path, capsys, monkeypatch, no_work):
    _hide_matplotlib(monkeypatch)
    rc, err = run_main(["bench", bench, "--plot", str(tmp_path / "p.png")], capsys)
    assert_one_line_error(rc, err, "--plot", "matplotlib")


@pytest.mark.parametrize("bench", BENCHES)
def test_cases_with_from_json_is_an_error(bench, tmp_path, capsys, no_work):
    path = tmp_path / "x.json"
    path.write_text("{}")
    cases = "8,4,3" if bench == "router" else "16,8,16,16,2"
    rc, err = run_main(["bench", bench, "--from-json", str(path), "--cases", cases], capsys)
    assert_one_line_error(rc, err, "--cases cannot be combined with --from-json")
    rc, err = run_main(["bench", bench, "--from-json", str(path), "--json", str(tmp_path / "o.json")], capsys)
    assert_one_line_error(rc, err, "--json cannot be combined with --from-json")


@pytest.mark.parametrize("argv, words", [
    (["bench", "layer", "--cases", "4,8,16,17,2"], ["E=17 is not a perfect square"]),
    (["bench", "layer", "--cases", "4,8,16,16,17"], ["k=17 > E=16"]),
    (["bench", "layer", "--cases", "4,8,16"], ["expected T,H,I,E,k"]),
    (["bench", "layer", "--cases", "4,8,16,16,0"], ["positive"]),
    (["bench", "layer", "--cases", ";"], ["no cases"]),
    (["bench", "router", "--cases", "8,4,17"], ["0 <= k <= N*N"]),
    (["bench", "router", "--cases", "8,x,1"], ["expected T,N,k"]),
    (["bench", "layer", "--dtype", "fp8"], ["unknown dtype 'fp8'"]),
    (["bench", "layer", "--variants", "layer,nope"], ["unknown variant"]),
    (["bench", "router", "--impls", "nope"], ["unknown implementation"]),
    (["bench", "layer", "--rep-ms", "nan"], ["--rep-ms"]),
    (["bench", "router", "--seed", "x"], ["--seed"]),
    (["bench", "layer", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["bench", "nothing"], ["invalid choice"]),
    ([], ["required"]),
])
def test_bad_arguments_are_one_line(argv, words, capsys):
    rc, err = run_main(argv, capsys)
    assert_one_line_error(rc, err, *words)
    # argparse names the option once; the message does not repeat it
    if "--cases" in argv:
        assert err.count("--cases") == 1, err


def test_errors_from_the_command_line_are_one_line(tmp_path):
    r = run_module("bench", "layer", "--from-json", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "no such file" in r.stderr


# --------------------------------------------------------------------------- shared options
COMMON = ("--cases", "--dtype", "--warmup-ms", "--rep-ms", "--seed", "--json", "--plot", "--from-json")


def _options(bench):
    sub = cli.build_parser()._subparsers._group_actions[0].choices["bench"]
    p = sub._subparsers._group_actions[0].choices[bench]
    return p, {s: a for a in p._actions for s in a.option_strings}


def test_router_and_layer_share_options():
    (pr, r), (pl, lay) = _options("router"), _options("layer")
    for opt in COMMON:
        assert opt in r and opt in lay, opt
        assert r[opt].default == lay[opt].default, opt
        assert r[opt].help and (opt == "--cases" or r[opt].help == lay[opt].help), opt
    for spelling, name in (("bf16", "bf16"), ("bfloat16", "bf16"), ("FP16", "fp16"), ("float16", "fp16"),
                           ("fp32", "fp32"), ("float32", "fp32")):
        for bench in BENCHES:
            assert cli.build_parser().parse_args(["bench", bench, "--dtype", spelling]).dtype == name


@pytest.mark.parametrize("bench", BENCHES)
def test_help_describes_what_exists(bench):
    r = run_module("bench", bench, "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for opt in COMMON:
        assert opt in text
    for stale in ("does not exist", "not written", "not available", "--case "):
        assert stale not in text


# --------------------------------------------------------------------------- bench layer
def test_bench_layer_tiny_case_on_this_device(tmp_path, capsys):
    out = tmp_path / "layer.json"
    case = (24, 16, 24, 16, 3)
    # Under the interpreter every timed call of a Triton variant costs seconds: time only
    # the PyTorch ones there (the checks still run the layer and the expert kernels).
    variants = (["peer_gather", "peer_bag", "reference"] if INTERPRET and not HAS_CUDA
                else list(bench_layer.VARIANTS))
    rc = cli.main(["bench", "layer", "--cases", ",".join(map(str, case)), "--warmup-ms", "0",
                   "--rep-ms", "0", "--dtype", "float32", "--json", str(out), "--variants", ",".join(variants)]
                  + (["--launches"] if HAS_CUDA else []))
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads(out.read_text())
    assert data["benchmark"] == "layer" and data["settings"]["dtype"] == "fp32"
    (row,) = data["rows"]
    assert (row["T"], row["hidden"], row["intermediate"], row["experts"], row["k"]) == case
    assert row["check"]["pass"] is True
    assert set(row["peer_check"]) == {"peer_gather", "peer_bag"} | ({"peer_layer"} & set(variants))
    assert all(r["pass"] for r in row["peer_check"].values())
    assert row["variants"] == variants
    for v in variants:
        for mode in ("fwd", "fwd+bwd"):
            assert row["times_ms"][f"{v} {mode}"] > 0
    for v in variants:
        key = f"{v} fwd+bwd"
        if HAS_CUDA:
            # a graph time, or '-' with the reason capture failed; forward and training step
            for k in (key, f"{v} fwd"):
                assert (row["graph_ms"][k] or 0) > 0 or f"{k} graph" in row["errors"], k
            assert row["host_ms"][key] > 0 and row["launches"][key] >= 1 and row["peak_mem_MiB"][key] >= 0
        else:
            assert not row["graph_ms"] and not row["host_ms"] and not row["launches"]
    if "layer" in variants:
        assert row["ratios"]["layer / dense_mlp fwd+bwd"] == pytest.approx(
            row["times_ms"]["layer fwd+bwd"] / row["times_ms"]["dense_mlp fwd+bwd"])
        assert row["ratios"]["expert speedup vs peer_bag fwd+bwd"] == pytest.approx(
            row["times_ms"]["peer_bag fwd+bwd"] / row["times_ms"]["expert fwd+bwd"])

    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(variants)
    if not HAS_CUDA:
        head = table[0]
        for gpu_only in ("graph", "host", "launches", "peak", "floor"):
            assert gpu_only not in head
        assert "| peer_bag | yes |" in printed
        assert "| expert | yes |" in printed or "expert" not in variants

    assert cli.main(["bench", "layer", "--from-json", str(out)]) == 0
    again = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert again == table


def test_layer_table_columns_by_device():
    row = {"T": 8, "hidden": 4, "intermediate": 8, "experts": 16, "k": 2, "distinct_experts": 9,
           "variants": ["layer", "expert", "dense_mlp"],
           "times_ms": {"layer fwd": 1.0, "layer fwd+bwd": 3.0, "expert fwd": 0.5, "expert fwd+bwd": 1.5,
                        "dense_mlp fwd": 1.0, "dense_mlp fwd+bwd": 2.0},
           "graph_ms": {"layer fwd": 0.9, "layer fwd+bwd": 2.5, "dense_mlp fwd+bwd": None},
           "host_ms": {"layer fwd+bwd": 0.4}, "launches": {"layer fwd+bwd": 48},
           "peak_mem_MiB": {"layer fwd+bwd": 10.0, "dense_mlp fwd+bwd": 4.0}, "expert_floor_ms": {"fwd+bwd": 0.5},
           "errors": {"dense_mlp fwd+bwd graph": "RuntimeError: capture failed"},
           "check": {"pass": True}}
    gpu = bench_layer.format_table([row], gpu=True)
    assert "| 8 | 4 | 8 | 16 | 2 | 9 | layer | - | 1.000 | 3.000 | 0.900 | 2.500 | 0.400 | 48 | 10 | 6 | 1.50 | - | - | - | - |" in gpu
    assert "| expert | yes | 0.500 | 1.500 | - | - | - | - | - | - | 0.75 | - | 1.00 | 3.0 |" in gpu
    assert "dense_mlp fwd+bwd graph: RuntimeError: capture failed" in gpu  # the footnote of '-'
    cpu = bench_layer.format_table([row], gpu=False)
    assert cpu.splitlines()[0] == "| T | H | I | E | k | D | variant | ok | fwd ms | f+b ms | f+b / mlp | f+b / expert |"
    assert "| 8 | 4 | 8 | 16 | 2 | 9 | layer | - | 1.000 | 3.000 | 1.50 | - |" in cpu


def test_router_cpu_table_has_no_gpu_columns():
    row = {"T": 8, "N": 4, "k": 3, "dtype": "bf16", "impl": "torch_pruned", "ok": True, "fwd_us": 10.0,
           "bwd_us": 5.0, "floor_us": 1e-4, "fwd_floor_frac": 1e-5}
    assert bench_router.format_table([row], gpu=False).splitlines()[0] == (
        "| T | N | k | dtype | impl | ok | fwd us | bwd us |")
    assert "floor" in bench_router.format_table([row], gpu=True)


@pytest.mark.parametrize("bench", BENCHES)
def test_cpu_plot_draws_no_floor(bench, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "hlines", lambda self, *a, **k: drawn.append(a))
    png = tmp_path / "p.png"
    if bench == "router":
        rows = [{"T": 8, "N": 4, "k": 3, "impl": "torch_pruned", "fwd_us": 10.0, "bwd_us": 5.0,
                 "floor_us": 1e-4}]
        bench_router.plot(rows, png, "t", floors_too=False)
    else:
        rows = [{"T": 8, "hidden": 4, "intermediate": 8, "experts": 16, "k": 2, "variants": ["expert"],
                 "times_ms": {"expert fwd+bwd": 1.0}, "expert_floor_ms": {"fwd+bwd": 0.1}}]
        bench_layer.plot(rows, png, "t", gpu=False)
    assert png.exists() and drawn == []


def test_bench_layer_a_failing_variant_is_reported_not_raised(monkeypatch, capsys):
    from omni_moe.bench import peers

    def broken(*args, **kwargs):
        raise RuntimeError("peer exploded\nsecond line")

    monkeypatch.setitem(peers.PEERS, "peer_bag", broken)
    rc = cli.main(["bench", "layer", "--cases", "8,8,8,16,2", "--warmup-ms", "0", "--rep-ms", "0",
                   "--dtype", "fp32", "--variants", "peer_gather,peer_bag"])
    captured = capsys.readouterr()
    assert rc == 1 and "FAILED" in captured.err
    assert "| peer_bag | NO | - | - |" in captured.out
    assert "peer_bag fwd+bwd: RuntimeError: peer exploded" in captured.out
    assert "| peer_gather | yes |" in captured.out


# --------------------------------------------------------------------------- bench layer --preset paper
def _table(text):
    return [line for line in text.splitlines() if line.startswith("| ")]


@pytest.fixture
def torch_paths(monkeypatch):
    """CPU tensors take the PyTorch paths (under the interpreter too: the preset's CPU
    form is timed there, and the interpreter would take minutes)."""
    if HAS_CUDA:
        pytest.skip("the CPU form of the preset")
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_bench_layer_preset_paper_on_cpu(tmp_path, capsys, torch_paths):
    """The whole preset at its CPU size: its rows in order, checked and timed, every row
    with the versions and its wall time; the JSON reprints the same table; the plot."""
    from omni_moe.bench import paper

    out = tmp_path / "paper.json"
    png = tmp_path / "paper.png"
    plot = importlib.util.find_spec("matplotlib") is not None
    rc = cli.main(["bench", "layer", "--preset", "paper", "--warmup-ms", "0", "--rep-ms", "0",
                   "--dtype", "fp32", "--json", str(out)] + (["--plot", str(png)] if plot else []))
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads(out.read_text())
    sizes = paper.PRESETS["paper"]["cpu"]
    assert data["preset"] == "paper" and data["mode"] == "cpu"
    assert data["preset_sizes"]["hidden"] == sizes.hidden == 32 and data["published"] == paper.PUBLISHED
    rows = data["rows"]
    assert [(r["T"], r["hidden"], r["intermediate"], r["experts"], r["k"], tuple(r["variants"])) for r in rows] \
        == [(*c, v) for c, v in sizes.cases()]
    for r in rows:
        assert r["torch"] == torch.__version__ and r["gpu"] is None and r["triton"] and r["date"]
        assert r["row_s"] > 0 and r["check"]["pass"] is True
        assert r["peer_check"]["peer_layer"]["pass"] is True
        for v in r["variants"]:
            assert r["times_ms"][f"{v} fwd"] > 0 and r["times_ms"][f"{v} fwd+bwd"] > 0
    assert data["environment"]["cpu_threads"]["torch_threads"] == torch.get_num_threads()
    assert "CPU threads:" in printed and "row done in" in printed
    table = _table(printed)
    assert table[0] == "| T | K | active M | variant | ok | fwd ms | f+b ms | fwd / layer | row s |"
    assert len(table) == 1 + sum(len(r["variants"]) for r in rows)
    assert [line.split(" | ")[3] for line in table[1:5]] == ["layer", "peer_layer", "layer", "peer_layer"]
    assert "published" not in printed  # the paper's figures are for its sizes, not these
    if plot:
        assert png.exists() and png.stat().st_size > 1000

    assert cli.main(["bench", "layer", "--from-json", str(out)]) == 0
    assert _table(capsys.readouterr().out) == table


def test_preset_cases_pick_rows_with_the_presets_sizes(tmp_path, capsys, torch_paths):
    out = tmp_path / "p.json"
    rc = cli.main(["bench", "layer", "--preset", "paper", "--cases", "48,5;16,12", "--variants", "peer_layer",
                   "--warmup-ms", "0", "--rep-ms", "0", "--dtype", "fp32", "--json", str(out)])
    assert rc == 0, capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["T"], r["hidden"], r["intermediate"], r["experts"], r["k"], r["variants"]) for r in rows] == [
        (48, 32, 32, 400, 5, ["peer_layer"]), (16, 32, 32, 400, 12, ["peer_layer"])]


def _oom(what="CUDA out of memory. Tried to allocate 20.00 GiB"):
    return torch.OutOfMemoryError(what)


def test_preset_out_of_memory_is_a_result_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch, torch_paths):
    """A fake allocation failure: in one variant of one row (reported 'OOM', the other
    measurements of the row and the next rows run) and while setting a row up (the row is
    skipped with a note); the run still exits 0."""
    from omni_moe.bench import peers

    real_gather, real_layer = peers.peer_gather, omni_moe.OmniMoE

    def gather(h, up, down, w, idx, act="silu"):
        if idx.shape == (48, 5) and torch.is_grad_enabled():  # the training step of the first row
            raise _oom()
        return real_gather(h, up, down, w, idx, act)

    def layer(config):
        if config.num_experts_per_token == 7:
            raise _oom()
        return real_layer(config)

    monkeypatch.setattr(peers, "peer_gather", gather)
    monkeypatch.setattr(omni_moe, "OmniMoE", layer)
    out = tmp_path / "p.json"
    try:
        rc = cli.main(["bench", "layer", "--preset", "paper", "--cases", "48,5;16,7;16,3", "--no-check",
                       "--warmup-ms", "0", "--rep-ms", "0", "--dtype", "fp32", "--json", str(out)])
    except Exception as e:  # noqa: BLE001 -- the bug this test is about
        raise AssertionError(f"the sweep stopped on {e!r}") from e
    printed = capsys.readouterr().out
    assert rc == 0, printed
    first, skipped, last = json.loads(out.read_text())["rows"]
    assert first["errors"] == {"peer_layer fwd+bwd": "out of memory"}
    assert first["times_ms"]["peer_layer fwd+bwd"] is None and first["times_ms"]["peer_layer fwd"] > 0
    assert first["times_ms"]["layer fwd+bwd"] > 0
    assert skipped["errors"] == {"setup": "out of memory"} and "times_ms" not in skipped and skipped["row_s"] >= 0
    assert last["times_ms"]["peer_layer fwd+bwd"] > 0 and not last["errors"]
    table = _table(printed)
    peer_first = [line for line in table if line.startswith("| 48 | 5 |") and "peer_layer" in line]
    assert len(peer_first) == 1 and " | OOM | " in peer_first[0]
    assert "T=16 H=32 E=400 k=7: skipped (setup: out of memory)" in printed


def test_bench_reports_threads_and_warns_when_oversubscribed(tmp_path, capsys, monkeypatch, torch_paths):
    busy = dict(bench_common.cpu_threads(), torch_threads=2, cores_available=2, cpus_total=2, load_1min=3.0,
                busy_cores=3.0, oversubscribed=True, suggested_threads=1)
    monkeypatch.setattr(bench_common, "cpu_threads", lambda processes=1: dict(busy, processes=processes))
    out = tmp_path / "l.json"
    rc, err = run_main(["bench", "layer", "--cases", "16,8,16,16,2", "--variants", "peer_gather", "--no-check",
                        "--warmup-ms", "0", "--rep-ms", "0", "--json", str(out)], capsys)
    assert rc == 0
    assert err.count("\n") == 1 and err.startswith("omni-moe bench layer: warning: CPU oversubscribed")
    assert "OMP_NUM_THREADS=1" in err
    assert json.loads(out.read_text())["environment"]["cpu_threads"]["oversubscribed"] is True
    assert cli.main(["bench", "layer", "--from-json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "OVERSUBSCRIBED" in captured.out and captured.err == ""  # a reprint measures nothing


@pytest.mark.parametrize("argv, words", [
    (["bench", "layer", "--preset", "nope"], ["invalid choice: 'nope'"]),
    (["bench", "layer", "--cases", "16,4"], ["--cases 'T,k' needs --preset"]),
    (["bench", "layer", "--preset", "paper", "--cases", "16,0"], ["need two positive integers"]),
    (["bench", "layer", "--preset", "paper", "--cases", "16,4;8,2,3"], ["expected T,H,I,E,k"]),
    (["bench", "layer", "--preset", "paper", "--cases", "16,100000000"], ["k=100000000 > E=", "preset"]),
    (["bench", "layer", "--preset", "paper", "--variants", "layer,nope"], ["unknown variant"]),
])
def test_preset_bad_arguments_are_one_line(argv, words, capsys, no_work):
    rc, err = run_main(argv, capsys)
    assert_one_line_error(rc, err, *words)


def test_preset_with_from_json_is_an_error(tmp_path, capsys, no_work):
    path = tmp_path / "x.json"
    path.write_text("{}")
    rc, err = run_main(["bench", "layer", "--preset", "paper", "--from-json", str(path)], capsys)
    assert_one_line_error(rc, err, "--preset cannot be combined with --from-json")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_bench_layer_preset_paper_on_cuda(tmp_path, capsys):
    """Two small rows at the paper's sizes (E = 102,400): both variants checked, forward
    and training step timed eagerly and from CUDA graphs, peak memory of each; the
    published figures under the table; the Figure 4 plot."""
    out, png = tmp_path / "paper.json", tmp_path / "paper.png"
    plot = importlib.util.find_spec("matplotlib") is not None
    rc = cli.main(["bench", "layer", "--preset", "paper", "--cases", "256,512;128,1250", "--warmup-ms", "1",
                   "--rep-ms", "5", "--json", str(out)] + (["--plot", str(png)] if plot else []))
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["T"], r["hidden"], r["intermediate"], r["experts"], r["k"]) for r in rows] == [
        (256, 1024, 1024, 102400, 512), (128, 1024, 1024, 102400, 1250)]
    for r in rows:
        assert r["gpu"] == torch.cuda.get_device_name() and r["check"]["pass"] is True
        assert r["peer_check"]["peer_layer"]["pass"] is True
        for v in r["variants"]:
            for mode in ("fwd", "fwd+bwd"):
                key = f"{v} {mode}"
                assert r["times_ms"][key] > 0 and r["peak_mem_MiB"][key] > 0, key
                assert (r["graph_ms"][key] or 0) > 0 or f"{key} graph" in r["errors"], key
    assert any(line.startswith("published, not measured here") for line in printed.splitlines())
    if plot:
        assert png.exists()
