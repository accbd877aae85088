"""Benchmark helpers: timing sample counts, peers of the expert path."""

import statistics
import sys
import time

import pytest
import torch

from conftest import script_module
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


@pytest.fixture
def distributed():
    yield from script_module("benchmarks/distributed.py", "bench_distributed")


def test_distributed_benchmark_rejects_bad_token_counts(distributed):
    import argparse

    assert distributed._token_counts("16384, 65536") == [16384, 65536]
    for bad in ("", "0", "16384,x", "-5"):
        with pytest.raises(argparse.ArgumentTypeError, match="--global-tokens"):
            distributed._token_counts(bad)
    assert distributed.parse(["--tiny"]).global_tokens == [256]
    assert distributed.parse([]).global_tokens == [16384]
    with pytest.raises(argparse.ArgumentTypeError, match="--phases: unknown phase"):
        distributed._phase_names("1gpu,fsdp2")
    assert distributed._phase_names("") == "" and set(distributed.BASELINE) <= set(distributed.PHASES)
    with pytest.raises(SystemExit):
        distributed.parse(["--big-phases", "fsdp,huge"])
    assert distributed.parse([]).big_phases == "ddp_sharded,fsdp,ddp,1gpu,1gpu_fsdp"


def test_distributed_benchmark_optional_phases(tmp_path):
    """The phases outside the default list (FSDP2 keeping gathered parameters for the
    backward, DDP with bf16 gradient all-reduce) run and compare with their 1-GPU twins;
    --trace profiles one more step per phase: a gzipped Chrome trace per rank taking part,
    its summary in the row (no GPU activity on CPU)."""
    import gzip
    import json

    # DDP's bf16 all-reduce hook needs a torch build with NCCL (the CUDA build has it
    # without a GPU; the CPU build does not).
    bf16_hook = torch.version.cuda is not None and torch.distributed.is_nccl_available()
    phases = ("1gpu", "1gpu_fsdp", "fsdp_keep") + (("ddp_bf16",) if bf16_hook else ())
    traces = tmp_path / "traces"
    _, got = _distributed_bench(tmp_path, "--phases", ",".join(phases),
                                "--global-tokens", "64", "--steps", "2", "--optimizer", "foreach",
                                "--trace", str(traces))
    comp = got["comparisons"]
    assert set(comp) == {"fsdp_keep_vs_1gpu_fsdp"} | ({"ddp_bf16_vs_1gpu"} if bf16_hook else set())
    assert comp["fsdp_keep_vs_1gpu_fsdp"]["loss_max_abs_diff"] < 1e-3
    if bf16_hook:
        assert comp["ddp_bf16_vs_1gpu"]["loss_max_abs_diff"] < 1e-2
    want = {f"64_{p}_rank0.json.gz" for p in phases}
    want |= {f"64_{p}_rank1.json.gz" for p in phases if p in ("fsdp_keep", "ddp_bf16")}
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


# --------------------------------------------------------------------------- CPU threads
def _machine(monkeypatch, threads, cores, cpus, load):
    """Pretend this process has ``threads`` torch threads, may run on ``cores`` of
    ``cpus`` CPUs, and the machine's 1-minute load is ``load`` (None: not reported)."""
    import os

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    if load is None:
        def no_load():
            raise OSError("no load average here")
        monkeypatch.setattr(os, "getloadavg", no_load, raising=False)
    else:
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load), raising=False)


@pytest.mark.parametrize("threads, cores, cpus, load, processes, over, suggested", [
    (2, 2, 2, 0.0, 1, False, 2),    # an idle machine: the default fits
    (2, 2, 2, 0.5, 1, False, 2),    # half a core busy: within the slack
    (2, 2, 2, 0.6, 1, True, 1),     # just past it
    (3, 2, 2, 0.0, 1, True, 2),     # more threads than cores, idle or not
    (2, 2, 2, 4.0, 1, True, 1),     # a shared machine: both cores busy
    (1, 2, 2, 4.0, 1, True, 1),     # even one thread waits
    (2, 2, 8, 2.0, 1, False, 2),    # 2 of 8 CPUs: a quarter of the host's load is ours
    (2, 2, 8, 6.0, 1, True, 1),     # ... 1.5 cores of it
    (1, 2, 2, 0.0, 2, False, 1),    # two processes of one thread each
    (1, 2, 2, 0.0, 3, True, 1),     # three
    (4, 4, 4, None, 1, False, 4),   # no load average: only the core count
    (5, 4, 4, None, 1, True, 4),
])
def test_cpu_threads_rule(monkeypatch, threads, cores, cpus, load, processes, over, suggested):
    _machine(monkeypatch, threads, cores, cpus, load)
    info = common.cpu_threads(processes)
    assert info["torch_threads"] == threads and info["cores_available"] == cores
    assert info["cpus_total"] == cpus and info["processes"] == processes
    assert info["oversubscribed"] is over
    assert info["suggested_threads"] == suggested
    if load is None:
        assert info["load_1min"] is None and info["busy_cores"] is None
    else:
        assert info["busy_cores"] == pytest.approx(load * cores / cpus)


def test_report_threads_prints_one_line_and_warns_only_when_oversubscribed(monkeypatch, capsys):
    _machine(monkeypatch, 2, 2, 2, 0.1)
    info = common.report_threads("prog")
    out, err = capsys.readouterr()
    assert not info["oversubscribed"] and err == ""
    assert out == ("prog: CPU threads: 2 torch threads on 2 cores available to this process (of 2), "
                   "1-minute load 0.10 (~0.1 of these cores busy)\n")

    _machine(monkeypatch, 2, 2, 2, 1.3)
    common.report_threads("prog")
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and "2 torch threads" in out
    assert err.count("\n") == 1 and err.startswith("prog: warning: CPU oversubscribed")
    assert "OMP_NUM_THREADS=1" in err  # fewer threads would fit

    _machine(monkeypatch, 1, 2, 2, 3.0)
    common.report_threads("prog")
    err = capsys.readouterr().err
    assert "1 torch thread on 2 cores" in err and "other processes hold the cores" in err
    assert "OMP_NUM_THREADS" not in err  # one thread is already the least


def test_environment_records_the_threads(monkeypatch):
    _machine(monkeypatch, 3, 2, 2, 0.0)
    env = common.environment()
    assert env["cpu_threads"]["torch_threads"] == 3 and env["cpu_threads"]["oversubscribed"] is True


# --------------------------------------------------------------------------- contradictory rows
def _row(times, graphs=None, **extra):
    return {"T": 64, "hidden": 32, "intermediate": 32, "experts": 400, "k": 16, "distinct_experts": 300,
            "variants": sorted({k.rsplit(" ", 1)[0] for k in times}), "times_ms": times,
            "graph_ms": graphs or {}, "errors": {}, "active_params": 6000, **extra}


@pytest.mark.parametrize("paper_table", [False, True])
def test_a_forward_slower_than_its_training_step_is_flagged(paper_table):
    from omni_moe.bench import paper

    fmt = paper.format_table if paper_table else bench_layer.format_table
    # the rows of the CPU run that made the contradiction visible: fwd 47.976, fwd+bwd 11.336
    bad = _row({"expert fwd": 47.976, "expert fwd+bwd": 11.336, "layer fwd": 1.0, "layer fwd+bwd": 3.0})
    text = fmt([bad], gpu=False)
    assert "47.976!" in text and "1.000!" not in text and "1.000 |" in text
    assert bench_layer.FWD_FLAG_NOTE in text and text.count(bench_layer.FWD_FLAG_NOTE) == 1
    # equal medians do not contradict each other; neither does a missing one
    fine = _row({"expert fwd": 2.0, "expert fwd+bwd": 2.0, "layer fwd": 5.0})
    text = fmt([fine], gpu=False)
    assert "!" not in text
    # CUDA-graph medians are held to the same rule, separately from the eager ones
    g = _row({"layer fwd": 1.0, "layer fwd+bwd": 3.0}, {"layer fwd": 4.0, "layer fwd+bwd": 2.0})
    text = fmt([g], gpu=True)
    assert "4.000!" in text and "1.000!" not in text and bench_layer.FWD_FLAG_NOTE in text
    assert "!" not in fmt([g], gpu=False)  # the graph column is not shown on CPU


# --------------------------------------------------------------------------- --preset paper
def test_paper_preset_rows():
    from omni_moe.bench import paper

    gpu = paper.PRESETS["paper"]["cuda"]
    assert (gpu.hidden, gpu.intermediate, gpu.experts) == (1024, 1024, 320 * 320)
    both, peer = ("layer", "peer_layer"), ("peer_layer",)
    assert list(gpu.rows) == [
        (1024, 512, both), (2048, 512, both), (4096, 512, both), (8192, 512, both), (16384, 512, both),
        (1024, 1024, both), (1024, 2048, both), (1024, 4096, both), (4096, 4096, both),
        (1024, 1250, peer), (1024, 12500, peer)]
    cpu = paper.PRESETS["paper"]["cpu"]
    assert (cpu.hidden, cpu.intermediate, cpu.experts) == (32, 32, 20 * 20)
    assert len(cpu.rows) == len(gpu.rows)
    for (t, k, v), (T, K, V) in zip(cpu.rows, gpu.rows):  # the same sweep, T and K / 32
        assert (t, k, v) == (T // 32, round(K / 32), V)
    for p in (gpu, cpu):
        assert all(bench_layer.check_case(c) is None for c, _ in p.cases())
    assert paper.resolve("paper", True) is gpu and paper.resolve("paper", False) is cpu


def test_active_params_counts_what_one_token_touches():
    from omni_moe import OmniMoE, OmniMoEConfig

    H, I, E, K = 8, 12, 25, 3
    layer = OmniMoE(OmniMoEConfig(hidden_size=H, intermediate_size=I, hidden_act="silu", num_experts=E,
                                  num_experts_per_token=K))
    dense = sum(p.numel() for n, p in layer.named_parameters() if "embed" not in n)  # MLP + gates
    assert bench_layer.active_params(H, I, E, K) == dense + 2 * K * H == 3 * H * I + 2 * 5 * H + 2 * K * H


def _paper_result(gpu=True):
    """A made-up run of the preset at its CUDA sizes: one OOM variant, one set-up OOM."""
    from omni_moe.bench import paper

    rows = []
    for (T, H, I, E, K), variants in paper.PRESETS["paper"]["cuda"].cases()[:3]:
        r = _row({}, T=T, hidden=H, intermediate=I, experts=E, k=K, variants=list(variants),
                 active_params=bench_layer.active_params(H, I, E, K), peak_mem_MiB={}, row_s=2.5,
                 check={"pass": True}, peer_check={"peer_layer": {"pass": True}})
        for v in variants:
            for mode, ms in (("fwd", 2.0), ("fwd+bwd", 5.0)):
                oom = v == "peer_layer" and T == 4096 and mode == "fwd+bwd"
                r["times_ms"][f"{v} {mode}"] = None if oom else ms * T / 1024 * (10 if v == "peer_layer" else 1)
                r["graph_ms"][f"{v} {mode}"] = None if oom else r["times_ms"][f"{v} {mode}"] * 0.8
                r["peak_mem_MiB"][f"{v} {mode}"] = None if oom else T / 8
                if oom:
                    r["errors"][f"{v} {mode}"] = "out of memory"
        rows.append(r)
    rows.append({"T": 16384, "hidden": 1024, "intermediate": 1024, "experts": 102400, "k": 512,
                 "variants": ["layer", "peer_layer"], "errors": {"setup": "out of memory"}})
    return {"benchmark": "layer", "mode": "cuda" if gpu else "cpu", "preset": "paper",
            "environment": {"gpu": "NVIDIA H100 80GB HBM3" if gpu else None, "torch": "2.11.0",
                            "triton": "3.6.0", "date": "2026-12-07T00:00:00+00:00"},
            "settings": {}, "copy_bandwidth_Bps": None, "rows": rows}


def test_paper_table_marks_out_of_memory_and_prints_the_published_figures(capsys):
    from omni_moe.bench import paper

    result = _paper_result()
    text = paper.format_table(result["rows"], gpu=True)
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert lines[0] == ("| T | K | active M | variant | ok | fwd ms | fwd graph ms | f+b ms | f+b graph ms | "
                        "fwd peak MiB | f+b peak MiB | fwd / layer | row s |")
    assert lines[1] == "| 1024 | 512 | 4.85 | layer | yes | 2.000 | 1.600 | 5.000 | 4.000 | 128 | 128 | - | 2.5 |"
    assert lines[2] == ("| 1024 | 512 | 4.85 | peer_layer | yes | 20.000 | 16.000 | 50.000 | 40.000 | 128 | 128 "
                        "| 10.00 | 2.5 |")
    # the training step ran out of memory: its time, graph and peak say so; the forward ran
    assert lines[6] == ("| 4096 | 512 | 4.85 | peer_layer | yes | 80.000 | 64.000 | OOM | OOM | 512 | OOM "
                        "| 10.00 | 2.5 |")
    assert len(lines) == 1 + 6  # the set-up OOM row has no measured line ...
    bench_layer._report(result)
    out = capsys.readouterr().out
    assert "T=16384 H=1024 E=102400 k=512: skipped (setup: out of memory)" in out  # ... but a note
    (pub,) = [ln for ln in out.splitlines() if ln.startswith("published")]
    assert "not measured here" in pub and "A100" in pub
    assert "OmniMoE 6.7 ms, PEER 73 ms, DeepSeekMoE 102 ms" in pub and "2-3 GiB" in pub
    # published figures belong to the paper's sizes only
    small = _paper_result(gpu=False)
    for r in small["rows"]:
        r["hidden"] = 32
    bench_layer._report(small)
    out = capsys.readouterr().out
    assert "published" not in out and "graph" not in out.splitlines()[1]


@pytest.mark.parametrize("gpu", [True, False])
def test_paper_plot_is_written(tmp_path, gpu, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from omni_moe.bench import paper

    drawn = []
    real_plot = matplotlib.axes.Axes.plot
    def plot(self, *a, **k):
        drawn.append((self.get_ylabel(), k.get("label")))
        return real_plot(self, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    png = tmp_path / "fig4.png"
    result = _paper_result(gpu)
    if not gpu:
        for r in result["rows"]:
            r.pop("graph_ms", None)
            r.pop("peak_mem_MiB", None)
    paper.plot(result["rows"], png, "t", gpu)
    assert png.exists() and png.stat().st_size > 1000
    labels = {lab for _, lab in drawn if lab}
    assert {"OmniMoE, fwd eager", "PEER-style, fwd eager"} <= labels
    assert ("OmniMoE, fwd CUDA graph" in labels) == gpu
    assert ("PEER-style: out of memory" in labels) == gpu  # the T=4096 training step
    assert ("OmniMoE, training step" in labels) == gpu


# --------------------------------------------------------------------------- peer_layer
def test_peer_layer_is_the_layer_computed_token_by_token(monkeypatch):
    from omni_moe import OmniMoE, OmniMoEConfig

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch paths
    torch.manual_seed(3)
    layer = OmniMoE(OmniMoEConfig(hidden_size=12, intermediate_size=20, hidden_act="gelu", num_experts=49,
                                  num_experts_per_token=5))
    h = torch.randn(9, 12)
    torch.testing.assert_close(peers.peer_layer(layer, h), layer(h), rtol=1e-5, atol=1e-6)
    res = bench_layer.check_peer_layer(layer, h, torch.float32)
    assert res["pass"] and max(v for k, v in res.items() if k != "pass") < 1e-6, res

    def no_mlp(layer, h):  # the expert sum alone
        scores, idx = layer.route(h)
        return peers.peer_gather(h, layer.up_embed.weight, layer.down_embed.weight, scores.exp(), idx,
                                 layer.act)

    def unweighted(h, up, down, w, idx, act="silu"):  # routing weights dropped
        return peers.PEERS["peer_gather"](h, up, down, torch.ones_like(w), idx, act)

    monkeypatch.setattr(peers, "peer_layer", no_mlp)
    assert bench_layer.check_peer_layer(layer, h, torch.float32)["pass"] is False
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(peers, "peer_gather", unweighted)
    assert bench_layer.check_peer_layer(layer, h, torch.float32)["pass"] is False
