"""Serving the layer: decode steps (eval, ``torch.inference_mode``) and ``omni-moe bench decode``.

A decode step runs the layer on the newest token of each request, T = 1 to 64 rows, as
(T, H) or (B, 1, H).  Its outputs must be the rows the full forward of the same tokens
gives: in eval every row is independent of the others (the BatchNorm router uses its
running statistics, so a batch of one works).  On the kernels (CUDA, or the interpreter)
and on the PyTorch path, for every router norm.  GPU (``-m gpu``): the step replayed from
a CUDA graph equals the eager step, and the eager step makes no device->host sync.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from conftest import HAS_CUDA
from omni_moe import OmniMoE, OmniMoEConfig, cli
from omni_moe.bench import common as bench_common
from omni_moe.bench import decode as bench_decode
from omni_moe.layers.reference import OmniMoEReference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cfg(H=16, I=24, E=64, k=5, norm="batchnorm"):
    return OmniMoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_token=k,
                         router_norm=norm)


def _eval_layer(device, norm, dtype=torch.float32, seed=7, **sizes):
    torch.manual_seed(seed)
    layer = OmniMoE(_cfg(norm=norm, **sizes)).to(device=device, dtype=dtype)
    with torch.no_grad():   # a training batch moves the running statistics off 0 and 1
        layer(3 * torch.randn(32, layer.hidden_size, device=device, dtype=dtype) + 1)
    return layer.eval()


def _row_rel(a, b):
    """Largest relative L2 error over the rows of (T, H) tensors."""
    a, b = a.detach().double(), b.detach().double()
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-300)).max())


# --------------------------------------------------------------------------- decode steps
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", "none"])
@pytest.mark.parametrize("T, S", [(1, 5), (8, 13)])
def test_decode_steps_equal_the_full_forward(path, norm, T, S):
    """S tokens once, then as decode steps of T (the last one shorter when T does not
    divide S), as (B, 1, H) like a batched generation step: each step's routing and
    output rows are the full forward's, and the full forward is the float64 twin's."""
    layer = _eval_layer(path, norm)
    H = layer.hidden_size
    x = torch.randn(S, H, device=path)
    oracle = OmniMoEReference.from_module(layer, torch.float64)
    with torch.inference_mode():
        full, (_, full_idx) = layer(x, return_routing=True)
        assert _row_rel(full, oracle(x.double(), indices=full_idx)) <= 1e-5
        steps = 0
        for s in range(0, S, T):
            step = x[s:s + T].unsqueeze(1)
            out, (_, idx) = layer(step, return_routing=True)
            assert out.shape == step.shape and idx.shape == (step.shape[0], 1, layer.top_k)
            assert torch.equal(idx[:, 0].sort(-1).values, full_idx[s:s + T].sort(-1).values), f"step at {s}"
            assert _row_rel(out[:, 0], full[s:s + T]) <= 1e-5, f"step at {s}"
            steps += 1
        assert steps == -(-S // T)
        empty = layer(x[:0])
        assert empty.shape == (0, H)


def test_batchnorm_decode_step_uses_running_statistics(path):
    """A single token in eval is normalised with the running statistics: the same as the
    float64 twin (BatchNorm1d in eval), and unchanged statistics after the call."""
    layer = _eval_layer(path, "batchnorm")
    before = [b.clone() for b in layer.buffers()]
    oracle = OmniMoEReference.from_module(layer, torch.float64)
    x = torch.randn(1, layer.hidden_size, device=path)
    with torch.inference_mode():
        out, (_, idx) = layer(x, return_routing=True)
        ref, (_, ref_idx) = oracle(x.double(), return_routing=True)
    assert torch.isfinite(out).all()
    assert torch.equal(idx.sort(-1).values.long(), ref_idx.sort(-1).values)
    assert _row_rel(out, ref) <= 1e-5
    assert all(torch.equal(a, b) for a, b in zip(before, layer.buffers()))


@pytest.mark.usefixtures("no_tf32")
# the interpreter runs the kernels in numpy, which warns on the NaN it is given on purpose
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_non_finite_request_stays_in_its_row(path):
    """One request of a decode step holding NaN (either sign) or inf: the other rows are
    those of the clean step, every routed index is in range and distinct within its row,
    and the bad rows are not silently finite."""
    layer = _eval_layer(path, "batchnorm")
    x = torch.randn(8, layer.hidden_size, device=path)
    bad = [3, 5, 6]
    y = x.clone()
    y[3] = float("nan")
    y[5] = -float("nan")
    y[6, 2] = float("inf")
    with torch.inference_mode():
        clean = layer(x)
        out, (_, idx) = layer(y, return_routing=True)
    good = [t for t in range(8) if t not in bad]
    assert _row_rel(out[good], clean[good]) <= 1e-5
    E = layer.num_expert_sqrt ** 2
    assert bool(((idx >= 0) & (idx < E)).all())
    assert all(len(set(row.tolist())) == layer.top_k for row in idx)
    assert not torch.isfinite(out[bad]).all(dim=-1).any()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("E, k", [(4096, 16), (65536, 1024)], ids=["small-k", "large-k"])
@pytest.mark.parametrize("T", [1, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_step_graph_replay_equals_eager_and_has_no_host_sync(E, k, T, dtype):
    """The decode step captured once and replayed on fresh tokens equals the eager step
    (same routing, same output within rounding) on every replay; after warm-up the eager
    step issues no device->host sync."""
    layer = _eval_layer("cuda", "batchnorm", dtype=dtype, H=256, I=512, E=E, k=k)
    static = torch.randn(T, 256, device="cuda", dtype=dtype)
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                layer(static, return_routing=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_out, (_, g_idx) = layer(static, return_routing=True)
        for i in range(3):
            x = torch.randn(T, 256, device="cuda", dtype=dtype)
            static.copy_(x)
            g_out.fill_(float("nan"))
            graph.replay()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out, (_, idx) = layer(x, return_routing=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert torch.equal(g_idx.sort(-1).values, idx.sort(-1).values), f"replay {i}"
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(g_out, out, **tol, msg=f"replay {i}")


# --------------------------------------------------------------------------- bench decode
def test_dense_baselines_have_the_layers_active_parameters(monkeypatch):
    """The dense MLP holds the parameters one token of the layer uses (shared MLP, both
    router gates, k experts' two rows), to within the rounding of its width; the shared
    MLP is the layer's own."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # sizes only: no kernel needs to run
    case = (16, 24, 64, 5)
    models = bench_decode.build_models(case, torch.float32, torch.device("cpu"), 40, "batchnorm", 0)
    layer, shared, dense, ref = (models[v] for v in bench_decode.VARIANTS)
    used = (sum(p.numel() for m in (layer.gate_proj, layer.up_proj, layer.down_proj,
                                    layer.router_gate_x, layer.router_gate_y) for p in m.parameters())
            + 2 * layer.top_k * layer.hidden_size)
    assert abs(sum(p.numel() for p in dense.parameters()) - used) <= 3 * 16 / 2
    assert bench_decode.active_params(*case) == used
    assert sum(p.numel() for p in ref.parameters()) == 3 * 16 * 40
    assert shared.gate_proj is layer.gate_proj and shared.down_proj is layer.down_proj
    assert not any(m.training for m in models.values())
    # the README's layer and the equal-active case sit near a dense I = 4096
    assert bench_decode.dense_intermediate(1024, 2048, 65536, 3072) == 4267


def test_floor_bytes_count_distinct_experts_once():
    """64 tokens of the equal-active case touching 62,502 distinct experts: the layer's
    weights read then exceed the dense MLP's tenfold, while one token's do not."""
    H, I, E, k = 1024, 2048, 65536, 3072
    f = bench_decode.floor_bytes(H, I, E, k, 64, 62502, 2)
    assert f["layer"] == 2 * (3 * H * I + 2 * 256 * H + 2 * 62502 * H + 2 * 64 * H)
    assert f["dense"] == 2 * (3 * H * 4267 + 2 * 64 * H)
    assert f["layer"] > 10 * f["dense"]
    one = bench_decode.floor_bytes(H, I, E, k, 1, k, 2)
    assert one["layer"] - one["dense"] == 2 * (3 * H * I + 2 * 256 * H + 2 * k * H - 3 * H * 4267)
    assert abs(one["layer"] - one["dense"]) <= 3 * H


def test_bench_decode_tiny_cases_write_json(tmp_path, capsys, monkeypatch):
    """Two tiny cases at decode and prefill T (64 the largest decode step): every variant timed, the check
    passes, the JSON holds one row per (case, T), --from-json reprints the same table."""
    if not HAS_CUDA:   # under the interpreter a timed Triton call costs seconds
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    out, png = tmp_path / "decode.json", tmp_path / "decode.png"
    plot = importlib.util.find_spec("matplotlib") is not None
    cases = [(16, 24, 64, 5), (8, 8, 16, 3)]
    rc = cli.main(["bench", "decode", "--cases", ";".join(",".join(map(str, c)) for c in cases),
                   "--tokens", "1,64,65", "--dense-intermediate", "40", "--warmup-ms", "0", "--rep-ms", "0",
                   "--dtype", "float32", "--json", str(out)] + (["--plot", str(png)] if plot else []))
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads(out.read_text())
    assert data["benchmark"] == "decode" and data["settings"]["dtype"] == "fp32"
    assert data["mode"] == ("cuda" if HAS_CUDA else "cpu")
    rows = data["rows"]
    assert [(r["hidden"], r["intermediate"], r["experts"], r["k"], r["T"]) for r in rows] == [
        (*c, T) for c in cases for T in (1, 64, 65)]
    assert [r["phase"] for r in rows] == ["decode", "decode", "prefill"] * 2
    for r in rows:
        H, I, E, k = r["hidden"], r["intermediate"], r["experts"], r["k"]
        N = int(E ** 0.5)
        assert r["check"]["pass"] is True and r["check"]["out"] <= 1e-4
        assert abs(3 * H * r["dense_intermediate"] - (3 * H * I + 2 * N * H + 2 * k * H)) <= 3 * H / 2
        assert r["dense_ref_intermediate"] == 40
        assert set(r["eager_us"]) == set(bench_decode.VARIANTS)
        assert all(v > 0 for v in r["eager_us"].values())
        assert r["ratios"]["layer / dense eager"] == pytest.approx(r["eager_us"]["layer"] / r["eager_us"]["dense"])
        T = r["T"]
        assert k <= r["distinct_experts"] <= min(E, T * k)
        assert r["floor_bytes"] == {"layer": 4 * (3 * H * I + 2 * N * H + 2 * r["distinct_experts"] * H + 2 * T * H),
                                    "dense": 4 * (3 * H * r["dense_intermediate"] + 2 * T * H)}
        if HAS_CUDA:
            bw = data["copy_bandwidth_Bps"]
            assert bw > 0 and r["floor_us"]["layer"] == pytest.approx(r["floor_bytes"]["layer"] / bw * 1e6)
        else:
            assert data["copy_bandwidth_Bps"] is None and r["floor_us"] == {}
        if HAS_CUDA:
            for v in bench_decode.VARIANTS:
                assert (r["graph_us"][v] or 0) > 0 or f"{v} graph" in r["errors"], v
                assert r["host_us"][v] > 0 and r["launches"][v] >= 1
        else:
            assert not r["graph_us"] and not r["host_us"] and not r["launches"]
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)   # the header, then one line per row
    assert ("graph" in printed) == HAS_CUDA and ("launches" in table[0]) == HAS_CUDA
    assert "| 16 | 24 | 64 | 5 | 1 | decode | yes |" in printed
    if plot:
        assert png.stat().st_size > 0
    assert cli.main(["bench", "decode", "--from-json", str(out)]) == 0
    again = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert again == table


def test_bench_decode_exits_1_when_the_layer_is_wrong(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    real = bench_decode.check_step

    def skewed(layer, oracle, h, dtype):
        with torch.no_grad():
            layer.down_embed.weight.mul_(1.01)   # the twin keeps the old rows
        return real(layer, oracle, h, dtype)

    monkeypatch.setattr(bench_decode, "check_step", skewed)
    rc = cli.main(["bench", "decode", "--cases", "16,24,64,5", "--tokens", "2", "--warmup-ms", "0",
                   "--rep-ms", "0", "--dtype", "fp32", "--no-graphs"])
    captured = capsys.readouterr()
    assert rc == 1 and "FAILED" in captured.err
    assert "| decode | NO |" in captured.out


def _run_main(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.fixture
def no_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(bench_decode, "run_case", boom)
    monkeypatch.setattr(bench_common, "environment", boom)


@pytest.mark.parametrize("argv, words", [
    (["--cases", "16,24,63,5"], ["E=63 is not a perfect square"]),
    (["--cases", "16,24,64,65"], ["k=65 > E=64"]),
    (["--cases", "16,24,64"], ["expected H,I,E,k"]),
    (["--cases", "16,24,64,0"], ["positive"]),
    (["--tokens", "0"], ["--tokens", "positive"]),
    (["--tokens", "1,x"], ["--tokens"]),
    (["--tokens", ""], ["--tokens"]),
    (["--dense-intermediate", "0"], ["--dense-intermediate"]),
    (["--router-norm", "rms"], ["--router-norm", "invalid choice"]),
    (["--dtype", "fp8"], ["unknown dtype 'fp8'"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_bad_arguments_are_one_line(argv, words, capsys, no_work):
    rc, err = _run_main(["bench", "decode", *argv], capsys)
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("omni-moe"), err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("extra", [["--tokens", "1"], ["--dense-intermediate", "64"], ["--cases", "16,24,64,5"]])
def test_from_json_with_run_options_is_one_line(extra, tmp_path, capsys, no_work):
    path = tmp_path / "d.json"
    path.write_text("{}")
    rc, err = _run_main(["bench", "decode", "--from-json", str(path), *extra], capsys)
    assert rc == 2 and err.count("\n") == 1 and "cannot be combined with --from-json" in err, err


@pytest.mark.parametrize("content", [
    {"benchmark": "layer", "rows": []},
    {"benchmark": "decode", "settings": {}, "rows": [{"T": 1}]},
    {"benchmark": "decode", "mode": "cpu", "settings": {"dtype": "fp32"}, "environment": {},
     "rows": [{"hidden": 1, "intermediate": 1, "experts": 1, "k": 1, "T": 1}]},
])
def test_from_json_wrong_content_is_one_line(content, tmp_path, capsys, no_work):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(content))
    rc, err = _run_main(["bench", "decode", "--from-json", str(path)], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--from-json" in err, err
