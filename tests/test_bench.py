"""Benchmark helpers: timing sample counts, peers of the expert path."""

import statistics
import time

import pytest
import torch

from omni_moe.bench import common


class FakeClock:
    """A clock that only the timed function moves: call i costs costs(i) ms."""

    def __init__(self, costs):
        self.now, self.calls, self.costs = 0.0, 0, costs

    def __call__(self):
        return self.now

    def fn(self):
        self.now += self.costs(self.calls) / 1e3
        self.calls += 1


@pytest.mark.parametrize("rep_ms, want", [(1.0, common.MIN_SAMPLES), (40.0, 40)])
def test_slow_first_call_leaves_a_full_sample(rep_ms, want):
    # 1 s first call, then 1 ms per call: the old helper sized its sample from the first
    # call and timed it once.
    clock = FakeClock(lambda i: 1000.0 if i == 0 else 1.0)
    times = common.samples_ms(clock.fn, warmup_ms=5, rep_ms=rep_ms, clock=clock, cuda=False)
    assert len(times) == want
    assert times == pytest.approx([1.0] * want)  # the first call is not among them
    # first call, 3 calls for the estimate, 5 ms of warm-up, then the timed calls
    assert clock.calls == 1 + 3 + 5 + want


def test_median_ms_with_a_real_slow_first_call():
    calls = []

    def fn():
        calls.append(None)
        if len(calls) == 1:
            time.sleep(0.3)

    ms = common.median_ms(fn, warmup_ms=1, rep_ms=1)
    assert ms < 100
    assert len(calls) >= 1 + common.MIN_SAMPLES


def test_min_samples_respected_when_every_call_is_slow():
    clock = FakeClock(lambda i: 50.0)
    times = common.samples_ms(clock.fn, warmup_ms=1, rep_ms=1, min_samples=7, clock=clock, cuda=False)
    assert len(times) == 7 and statistics.median(times) == pytest.approx(50.0)


def test_grad_to_none_resets_before_every_call():
    x = torch.ones(3, requires_grad=True)
    seen = []

    def step():
        seen.append(x.grad is None)
        (x * 2).sum().backward()

    common.samples_ms(step, warmup_ms=0, rep_ms=0, min_samples=3, grad_to_none=[x], cuda=False)
    assert all(seen) and len(seen) >= 1 + 3 + 3


# --------------------------------------------------------------------------- peers
from omni_moe.bench import layer as bench_layer  # noqa: E402
from omni_moe.bench import peers  # noqa: E402


def _oracle(h, up, down, w, idx, act):
    """float64 loop over tokens and slots: the atomic-expert sum by its definition."""
    f = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
         "relu": torch.nn.functional.relu}[act]
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for r in range(idx.shape[1]):
            e = int(idx[t, r])
            out[t] += f(up[e] @ h[t]) * w[t, r] * down[e]
    return out


def _inputs(T, H, E, k, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g, dtype=dtype)
    up = torch.randn(E, H, generator=g, dtype=dtype) / H**0.5
    down = torch.randn(E, H, generator=g, dtype=dtype)
    w = torch.rand(T, k, generator=g, dtype=dtype)
    # distinct experts per row, like the router's output; int32 like its indices
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)] or [torch.empty(0, k)])
    idx = idx.reshape(T, k).int()
    return h, up, down, w, idx


@pytest.mark.parametrize("name", list(peers.PEERS))
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("T, H, E, k", [(7, 5, 9, 3), (1, 3, 4, 4), (0, 4, 9, 2), (12, 6, 25, 1)])
def test_peer_matches_the_definition_in_float64(name, act, T, H, E, k):
    h, up, down, w, idx = _inputs(T, H, E, k, seed=T * 100 + E)
    leaves = [t.clone().requires_grad_() for t in (h, up, down, w)]
    out = peers.PEERS[name](*leaves, idx, act)
    want = _oracle(h, up, down, w, idx, act)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    if T:
        g = torch.randn_like(out)
        out.backward(g)
        ref = [t.clone().requires_grad_() for t in (h, up, down, w)]
        _oracle(*ref, idx, act).backward(g)
        for a, b in zip(leaves, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_peers_take_non_contiguous_inputs():
    h, up, down, w, idx = _inputs(6, 8, 16, 3, seed=1)
    ht = h.t().contiguous().t()
    wt = torch.stack([w, w], 2)[..., 0]
    assert not ht.is_contiguous() and not wt.is_contiguous()
    for fn in peers.PEERS.values():
        torch.testing.assert_close(fn(ht, up, down, wt, idx), _oracle(h, up, down, w, idx, "silu"))


def test_check_peers_passes_the_peers_and_catches_a_wrong_one(monkeypatch):
    h, up, down, w, idx = _inputs(16, 8, 16, 3, seed=2, dtype=torch.float32)
    res = bench_layer.check_peers(h, up, down, w, idx, "silu", torch.float32, list(peers.PEERS))
    assert set(res) == set(peers.PEERS) and all(r["pass"] for r in res.values()), res

    def slots_swapped(h, up, down, w, idx, act="silu"):  # weights of the wrong slots
        return peers.peer_gather(h, up, down, w.flip(1), idx, act)

    def unweighted(h, up, down, w, idx, act="silu"):  # no gradient for the weights at all
        return peers.peer_gather(h, up, down, torch.ones_like(w), idx, act)

    for wrong in (slots_swapped, unweighted):
        monkeypatch.setitem(peers.PEERS, "peer_gather", wrong)
        res = bench_layer.check_peers(h, up, down, w, idx, "silu", torch.float32, ["peer_gather"])
        assert res["peer_gather"]["pass"] is False


def test_peers_in_bfloat16_stay_within_the_check_tolerance():
    h, up, down, w, idx = _inputs(64, 32, 64, 4, seed=3, dtype=torch.float32)
    res = bench_layer.check_peers(h.bfloat16(), up.bfloat16(), down.bfloat16(), w, idx, "silu",
                                  torch.bfloat16, list(peers.PEERS))
    assert all(r["pass"] for r in res.values()), res


# --------------------------------------------------------------------------- GPU-only helpers
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_step_host_time_and_launches_on_cuda():
    x = torch.randn(256, 256, device="cuda", requires_grad=True)
    wt = torch.randn(256, 256, device="cuda", requires_grad=True)
    g = torch.randn(256, 256, device="cuda")

    def step():
        (x @ wt).relu().backward(g)

    ms = bench_layer.graph_step_ms(step, [x, wt], 5, 20)
    assert ms > 0 and x.grad is None
    assert common.host_ms(step, grad_to_none=[x, wt]) > 0
    n = common.cuda_launches(lambda: (setattr(x, "grad", None), setattr(wt, "grad", None), step()))
    assert 3 <= n <= 20  # matmul, relu, and the backward's matmuls and mask

    def syncing_step():
        step()
        float(x.grad.sum())  # a host sync: cannot be captured

    with pytest.raises(Exception):
        bench_layer.graph_step_ms(syncing_step, [x, wt], 5, 20)
    torch.cuda.synchronize()
    # the device is usable after a failed capture (the benchmark goes on with the next variant)
    assert torch.ones(1, device="cuda").item() == 1.0 and x.grad is None


# ----------------------------------------------------------------------------- benchmarks/distributed.py
def _distributed_bench(tmp_path, *args):
    """``torchrun --nproc-per-node 2 benchmarks/distributed.py --tiny --device cpu`` (gloo,
    one warm-up step) with ``args``: (the finished process, its JSON)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..")
    out = tmp_path / "dist.json"
    env = dict(os.environ, PYTHONPATH=root)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(root, "benchmarks", "distributed.py"), "--tiny", "--device", "cpu",
           "--warmup", "1", "--json", str(out), *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads(out.read_text())


def test_distributed_benchmark_sweeps_sizes_with_a_time_breakdown(tmp_path):
    """``torchrun --nproc-per-node 2 benchmarks/distributed.py --tiny --device cpu`` (gloo)
    with two global token counts: every phase at every size, each with its forward,
    backward and optimizer times; the first size also under the old top-level keys."""
    run, got = _distributed_bench(tmp_path, "--phases", "1gpu,ddp", "--global-tokens", "64,128",
                                  "--steps", "3")
    assert got["global_tokens"] == [64, 128] and set(got["by_tokens"]) == {"64", "128"}
    assert got["phases"] == got["by_tokens"]["64"]["phases"]
    for size, entry in got["by_tokens"].items():
        assert set(entry["phases"]) == {"1gpu", "ddp"} and "ddp_vs_1gpu" in entry["comparisons"]
        for res in entry["phases"].values():
            assert res["global_tokens"] == int(size) and len(res["step_parts_ms"]) == 3
            b = res["breakdown_ms"]
            assert all(b[k] > 0 for k in ("forward", "backward", "optimizer", "fwd_bwd"))
            assert b["fwd_bwd"] <= res["step_ms"] * 1.5
    assert run.stdout.count(" fwd ") == 4 and " bwd " in run.stdout and " opt " in run.stdout


def test_distributed_benchmark_rejects_bad_token_counts():
    import argparse
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "bench_distributed", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "distributed.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod._token_counts("16384, 65536") == [16384, 65536]
    for bad in ("", "0", "16384,x", "-5"):
        with pytest.raises(argparse.ArgumentTypeError, match="--global-tokens"):
            mod._token_counts(bad)
    assert mod.parse(["--tiny"]).global_tokens == [256]
    assert mod.parse([]).global_tokens == [16384]
    with pytest.raises(argparse.ArgumentTypeError, match="--phases: unknown phase"):
        mod._phase_names("1gpu,fsdp2")
    assert mod._phase_names("") == "" and set(mod.BASELINE) <= set(mod.PHASES)
    with pytest.raises(SystemExit):
        mod.parse(["--big-phases", "fsdp,huge"])
    assert mod.parse([]).big_phases == "ddp_sharded,fsdp,ddp,1gpu,1gpu_fsdp"


def test_distributed_benchmark_optional_phases(tmp_path):
    """The phases outside the default list (FSDP2 keeping gathered parameters for the
    backward, DDP with bf16 gradient all-reduce) run and compare with their 1-GPU twins;
    --trace profiles one more step per phase: a gzipped Chrome trace per rank taking part,
    its summary in the row (no GPU activity on CPU)."""
    import gzip
    import json

    traces = tmp_path / "traces"
    _, got = _distributed_bench(tmp_path, "--phases", "1gpu,1gpu_fsdp,fsdp_keep,ddp_bf16",
                                "--global-tokens", "64", "--steps", "2", "--optimizer", "foreach",
                                "--trace", str(traces))
    comp = got["comparisons"]
    assert set(comp) == {"fsdp_keep_vs_1gpu_fsdp", "ddp_bf16_vs_1gpu"}
    assert comp["fsdp_keep_vs_1gpu_fsdp"]["loss_max_abs_diff"] < 1e-3
    assert comp["ddp_bf16_vs_1gpu"]["loss_max_abs_diff"] < 1e-2
    want = {f"64_{p}_rank0.json.gz" for p in ("1gpu", "1gpu_fsdp", "fsdp_keep", "ddp_bf16")}
    want |= {"64_fsdp_keep_rank1.json.gz", "64_ddp_bf16_rank1.json.gz"}
    assert {f.name for f in traces.iterdir()} == want
    for name, res in got["phases"].items():
        assert res["optimizer"] == "foreach" and res["trace"]["gpu_events"] == 0
        with gzip.open(res["trace"]["path"], "rt") as f:
            assert any(e.get("name") == "aten::mm" for e in json.load(f)["traceEvents"])


def test_distributed_benchmark_big_model_phases(tmp_path):
    """--big runs the --big-phases at --big-experts experts (two-GPU phases first), keyed
    with the expert count and compared with their one-GPU twins."""
    run, got = _distributed_bench(tmp_path, "--phases", "", "--big", "--big-phases", "1gpu,ddp_sharded",
                                  "--global-tokens", "64", "--steps", "2")
    assert set(got["phases"]) == {"1gpu_E1024", "ddp_sharded_E1024"}
    assert got["phases"]["ddp_sharded_E1024"]["experts"] == 1024
    assert set(got["comparisons"]) == {"ddp_sharded_E1024_vs_1gpu_E1024"}
    assert run.stdout.index("ddp_sharded_E1024 ") < run.stdout.index("1gpu_E1024 ")


def test_trace_summary_splits_compute_communication_and_idle():
    """omni_moe.bench.trace.summarise on a hand-made trace: overlapping intervals count once,
    exposed communication is NCCL time with no other GPU work, host events are ignored."""
    from omni_moe.bench.trace import format_summary, summarise

    def gpu(name, ts, dur, stream, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}

    trace = {"traceEvents": [
        gpu("gemm", 1000, 10, 7), gpu("gemm", 1020, 10, 7), gpu("add", 1002, 3, 8),
        gpu("ncclDevKernel_AllReduce_Sum_f32", 1005, 20, 20),
        gpu("Memcpy DtoD", 1040, 5, 7, cat="gpu_memcpy"),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 1100},
    ]}
    s = summarise(trace, top=2)
    got = {k: round(s[k] * 1e3, 6) for k in ("span_ms", "compute_busy_ms", "comm_ms",
                                            "exposed_comm_ms", "idle_ms")}
    assert got == {"span_ms": 45, "compute_busy_ms": 25, "comm_ms": 20, "exposed_comm_ms": 10,
                   "idle_ms": 10}
    assert s["gpu_events"] == 5
    assert {k: round(v * 1e3, 6) for k, v in s["streams_busy_ms"].items()} == {"7": 25, "8": 3, "20": 20}
    assert [(k["name"], k["calls"]) for k in s["top_kernels"]] == [
        ("gemm", 2), ("ncclDevKernel_AllReduce_Sum_f32", 1)]
    assert "exposed 0.01" in format_summary(s)
    assert summarise({"traceEvents": [trace["traceEvents"][5]]}) == {"gpu_events": 0}


def test_profile_layer_dry_run(tmp_path):
    """benchmarks/profile_layer.py --dry: the host-time part at a tiny size on CPU (kernels
    through the interpreter), written as JSON with the versions."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..")
    out = tmp_path / "p.json"
    env = dict(os.environ, PYTHONPATH=root, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "profile_layer.py"), "--dry",
                    "--json", str(out)], env=env, check=True, capture_output=True, timeout=600)
    data = json.loads(out.read_text())
    assert data["meta"]["device"] == "cpu (dry)" and "torch" in data["meta"]
    (row,) = data["cases"]
    assert row["case"] == [48, 32, 48, 64, 4] and row["triton_launches"] > 0
    assert set(row["host_ms"]) == {"router_forward", "output_forward", "backward", "layer_step",
                                   "mlp_step"}
    assert all(v > 0 for v in row["host_ms"].values())
