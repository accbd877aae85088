"""OmniMoE under torch.distributed on CPU (gloo, 2 spawned processes) against one
process on the concatenated batch: synchronised router statistics (PyTorch path, and the
router-norm kernels under TRITON_INTERPRET=1), DDP, FSDP2 and row-sharded expert tables.
A ``gpu`` variant runs the same checks with NCCL on two CUDA devices.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn

from dist_utils import JOIN_TIMEOUT_S, run_ranks
from omni_moe import OmniMoE, OmniMoEConfig, param_groups

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

H = 16


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


def make_cfg(sync=None, E=49, k=3):
    return OmniMoEConfig(hidden_size=H, intermediate_size=24, num_experts=E,
                         num_experts_per_token=k, sync_router_stats=sync)


def batches(sizes_per_step, seed=1):
    """Per step: (x, gout) of the concatenated batch, and the rank offsets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for sizes in sizes_per_step:
        T = sum(sizes)
        off = [sum(sizes[:r]) for r in range(len(sizes) + 1)]
        out.append((torch.randn(T, H, generator=g) * 2 + 0.5, torch.randn(T, H, generator=g), off))
    return out


# ----------------------------------------------------------------------------- router statistics
SIZES = [(7, 12), (1, 4), (0, 6)]   # unequal, a 1-token rank, an empty rank


def _run_layer(layer, data, rank=None, device="cpu"):
    outs = []
    for x, gout, off in data:
        sl = slice(off[rank], off[rank + 1]) if rank is not None else slice(None)
        xr = x[sl].to(device).requires_grad_()
        out, (_, idx) = layer(xr, return_routing=True)
        out.backward(gout[sl].to(device))
        outs.append((out.detach().cpu(), idx.cpu(), xr.grad.cpu()))
    grads = {n: p.grad.cpu() for n, p in layer.named_parameters()}
    bufs = {n: b.cpu() for n, b in layer.named_buffers()}
    return outs, grads, bufs


def _dev(device, rank):
    return f"cuda:{rank}" if device == "cuda" else device


def _cumulative(layer):
    """Running statistics as a cumulative average (BatchNorm's momentum=None)."""
    layer.router_norm_x.momentum = layer.router_norm_y.momentum = None
    return layer


def _sync_worker(rank, world, interpret, device="cpu", cumulative=False):
    if interpret:
        assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    layer = OmniMoE(make_cfg()).to(_dev(device, rank))
    if cumulative:
        _cumulative(layer)
    from omni_moe.distributed import router_stats_group
    from omni_moe.layers.router_stats import _fused_ok

    assert router_stats_group(layer) is not None
    # the path under test: kernels on CUDA and under the interpreter
    fused = (interpret or device == "cuda") and not cumulative
    assert _fused_ok(layer, torch.empty(1, H, device=_dev(device, rank))) == fused
    return _run_layer(layer, batches(SIZES), rank, _dev(device, rank))


def _check_against_single(results, sizes=SIZES, tol=1e-5, device="cpu", cumulative=False):
    torch.manual_seed(0)
    single = OmniMoE(make_cfg()).to(device)
    if cumulative:
        _cumulative(single)
    outs, grads, bufs = _run_layer(single, batches(sizes), device=device)
    data = batches(sizes)
    for rank, (r_outs, r_grads, r_bufs) in enumerate(results):
        for step, ((o, i, gx), (so, si, sgx)) in enumerate(zip(r_outs, outs)):
            sl = slice(data[step][2][rank], data[step][2][rank + 1])
            assert torch.equal(i, si[sl]), f"rank {rank} step {step}: routing differs"
            assert rel(o, so[sl]) <= tol, f"rank {rank} step {step}: output"
            assert rel(gx, sgx[sl]) <= tol, f"rank {rank} step {step}: input gradient"
        for name, b in bufs.items():
            if b.is_floating_point():
                assert rel(r_bufs[name], b) <= 1e-6, f"rank {rank}: {name}"
            else:
                assert torch.equal(r_bufs[name], b), f"rank {rank}: {name}"
    for name, g in grads.items():
        total = sum(r[1][name] for r in results)
        assert rel(total, g) <= tol, f"gradient of {name}"


def test_sync_router_stats_torch_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _check_against_single(run_ranks(_sync_worker, 2, False))


def test_sync_router_stats_cumulative_average(monkeypatch):
    """momentum=None (PyTorch path): the running average's factor 1 / num_batches_tracked
    is taken on the device."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _check_against_single(run_ranks(_sync_worker, 2, False, "cpu", True), cumulative=True)


def test_sync_router_stats_kernels(monkeypatch):
    """The router-norm kernels (partials, all-gather, finalize with per-split counts;
    sums all-reduce) through Triton's interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    results = run_ranks(_sync_worker, 2, True)
    # The reference: one process on the PyTorch path (this process's Triton may not be
    # in interpreter mode).
    monkeypatch.delenv("TRITON_INTERPRET")
    _check_against_single(results)


def _run_normalized(layer, data, rank=None):
    """Per step the layer's normalised router logits of this rank's rows, after a
    backward of a z-loss summed over them (summed over ranks: the one-process sum)."""
    outs = []
    for x, _, off in data:
        sl = slice(off[rank], off[rank + 1]) if rank is not None else slice(None)
        lx, ly = layer.normalized_router_logits(x[sl])
        torch.logsumexp(torch.stack((lx, ly)), -1).square().sum().backward()
        outs.append(torch.cat((lx, ly), -1).detach())
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return outs, grads, {n: b.clone() for n, b in layer.named_buffers()}


def _normalized_worker(rank, world, sizes):
    torch.manual_seed(0)
    return _run_normalized(OmniMoE(make_cfg()), batches(sizes), rank)


@pytest.mark.parametrize("sizes", [[(7, 12), (5, 9)], SIZES], ids=["plain", "few_tokens"])
def test_sync_normalized_router_logits(sizes, monkeypatch):
    """normalized_router_logits (what a router z-loss reads) with synchronised statistics:
    each rank's rows, the gate gradients (summed over ranks) and the running statistics
    are those of one process on the concatenated batch."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    results = run_ranks(_normalized_worker, 2, sizes)
    torch.manual_seed(0)
    outs, grads, bufs = _run_normalized(OmniMoE(make_cfg()), batches(sizes))
    data = batches(sizes)
    assert set(grads) == {"router_gate_x.weight", "router_gate_y.weight"}
    for rank, (r_outs, r_grads, r_bufs) in enumerate(results):
        for step, (o, so) in enumerate(zip(r_outs, outs)):
            sl = slice(data[step][2][rank], data[step][2][rank + 1])
            assert rel(o, so[sl]) <= 1e-5, f"rank {rank} step {step}"
        for name, b in bufs.items():
            assert rel(r_bufs[name], b) <= 1e-6, f"rank {rank}: {name}"
    for name, g in grads.items():
        assert rel(sum(r[1][name] for r in results), g) <= 1e-5, name


def test_sync_requires_group():
    layer = OmniMoE(make_cfg(sync=True))
    with pytest.raises(ValueError, match="sync_router_stats"):
        layer(torch.randn(4, H))
    with pytest.raises(TypeError, match="sync_router_stats"):
        make_cfg(sync=1)


def test_split_counts_follow_split_rows():
    """The per-split counts built on the device from the ranks' counts are the
    single-process launcher's split rule."""
    from omni_moe.layers.router_stats import _split_counts
    from omni_moe.ops.router_norm.kernels import split_rows

    Ts = list(range(0, 70)) + [511, 512, 513, 4097]
    for S_max in (1, 2, 3, 8, 16, 64):
        got = _split_counts(torch.tensor(Ts, dtype=torch.float32), S_max).view(len(Ts), S_max)
        for T, row in zip(Ts, got.tolist()):
            S, rows = split_rows(T, S_max) if T else (0, 1)
            want = [min(rows, T - s * rows) for s in range(S)] + [0] * (S_max - S)
            assert row == want, (T, S_max)


FEW = [(3, 4), (1, 0), (0, 0)]   # a normal step, then one token in total, then none


def _few_tokens_worker(rank, world, interpret):
    import torch.distributed as dist

    from omni_moe.distributed import router_stats_group, set_router_stats_group
    from omni_moe.layers.router_stats import _fused_ok

    torch.manual_seed(0)
    layer = OmniMoE(make_cfg())
    assert _fused_ok(layer, torch.empty(1, H)) == interpret
    steps = []
    for x, gout, off in batches(FEW):
        sl = slice(off[rank], off[rank + 1])
        layer.zero_grad(set_to_none=False)
        xr = x[sl].clone().requires_grad_()
        out, (_, idx) = layer(xr, return_routing=True)
        out.backward(gout[sl])
        steps.append((out.detach(), idx, xr.grad, {n: p.grad.clone() for n, p in layer.named_parameters()},
                      {n: b.clone() for n, b in layer.named_buffers()}))
    assert router_stats_group(layer) is dist.group.WORLD
    singles = [dist.new_group([r]) for r in range(world)]
    pair = dist.new_group(list(range(world)))
    set_router_stats_group(nn.Sequential(layer), singles[rank])
    alone = router_stats_group(layer)
    set_router_stats_group(layer, pair)
    return steps, (alone, router_stats_group(layer) is pair, router_stats_group(layer.eval()))


@pytest.mark.parametrize("interpret", [False, True], ids=["torch", "kernels"])
def test_sync_fewer_than_two_tokens_uses_running_stats(interpret, monkeypatch):
    """One token over all ranks (or none): no rank raises (the count is never read on the
    host); the tokens are normalised with the running statistics, which stay unchanged
    with their counters, and the gradients are the eval-mode ones.  The statistics group
    is settable, and a group of one process means no exchange."""
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    results = run_ranks(_few_tokens_worker, 2, interpret)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    data = batches(FEW)
    torch.manual_seed(0)
    single = OmniMoE(make_cfg())
    x, gout, _ = data[0]
    single(x).backward(gout)
    after_first = {n: b.clone() for n, b in single.named_buffers()}
    single.eval().zero_grad()
    x, gout, _ = data[1]
    xs = x.clone().requires_grad_()
    out, (_, idx) = single(xs, return_routing=True)
    out.backward(gout)
    for rank, (steps, (alone, is_pair, in_eval)) in enumerate(results):
        assert alone is None and is_pair and in_eval is None
        for name, b in after_first.items():
            assert rel(steps[0][4][name], b) <= 1e-6, f"rank {rank}: {name}"
        for step in (1, 2):
            for name, b in steps[step][4].items():
                assert torch.equal(b, steps[0][4][name]), f"rank {rank} step {step}: {name} changed"
                assert torch.isfinite(b.float()).all()
        assert steps[2][0].shape[0] == 0
    o, i, gx = results[0][0][1][:3]
    assert torch.equal(i, idx) and rel(o, out) <= 1e-5 and rel(gx, xs.grad) <= 1e-5
    assert results[1][0][1][0].shape[0] == 0
    for name, p in single.named_parameters():
        total = results[0][0][1][3][name] + results[1][0][1][3][name]
        assert rel(total, p.grad) <= 1e-5, f"gradient of {name}"


_HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__",
               "__complex__", "__array__")


class _NoHostReads:
    """Tensor methods that hand a value to Python raise while active.  On CPU a host
    read is not a copy, so this is the structural check: none of the code between the
    launches looks at a tensor's value.  Launches (under the Triton interpreter they
    read their tensors on the host, as a GPU would on the device) lift it."""

    def __init__(self):
        self.depth = 0
        self.saved = {n: getattr(torch.Tensor, n) for n in _HOST_READS if hasattr(torch.Tensor, n)}

    def __enter__(self):
        self.depth += 1
        if self.depth == 1:
            for name in self.saved:
                setattr(torch.Tensor, name, self._refuse(name))
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            for name, fn in self.saved.items():
                setattr(torch.Tensor, name, fn)

    @staticmethod
    def _refuse(name):
        def refuse(self, *args, **kwargs):
            raise AssertionError(f"host read of a tensor (Tensor.{name}) in the synchronised statistics")
        return refuse

    def lifted(self, fn):
        def call(*args, **kwargs):
            saved, self.depth = self.depth, 0
            for name, f in self.saved.items():
                setattr(torch.Tensor, name, f)
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth = saved
                if saved:
                    for name in self.saved:
                        setattr(torch.Tensor, name, self._refuse(name))
        return call


def _no_host_read_worker(rank, world, interpret):
    import torch.distributed as dist

    from omni_moe.layers.router_stats import _fused_ok, sync_router_log_probs
    from omni_moe.ops.router_norm import kernels as rn

    torch.manual_seed(0)
    layer = OmniMoE(make_cfg())
    assert _fused_ok(layer, torch.empty(1, H)) == interpret
    guard = _NoHostReads()
    for name in ("stats_partials", "stats_finalize", "rows_forward", "rows_backward",
                 "sums_finalize", "bn_backward"):
        setattr(rn, name, guard.lifted(getattr(rn, name)))
    with guard:
        try:
            torch.ones(1).item()
        except AssertionError:
            pass
        else:
            raise RuntimeError("the guard does not catch Tensor.item")
    seen = []
    for sizes in ((5, 3), (1, 0), (0, 0)):
        h = torch.randn(sizes[rank], H)
        h.requires_grad_()
        with guard:
            px, py = sync_router_log_probs(layer, h, dist.group.WORLD)
            torch.autograd.backward((px, py), (torch.randn_like(px), torch.randn_like(py)))
        seen.append(h.grad.shape[0])
    return seen


@pytest.mark.parametrize("interpret", [False, True], ids=["torch", "kernels"])
def test_sync_router_stats_no_host_reads(interpret, monkeypatch):
    """The synchronised forward and backward (2 gloo ranks) never read a tensor's value
    on the host: a normal step, one token in total, none."""
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert run_ranks(_no_host_read_worker, 2, interpret) == [[5, 1, 0], [3, 0, 0]]


def _ddp_sync_debug_worker(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from omni_moe.layers.router_stats import _fused_ok

    dev = f"cuda:{rank}"
    torch.manual_seed(0)
    model = DDP(tiny_model().to(dev), device_ids=[rank])
    assert _fused_ok(model.module[0], torch.empty(1, H, device=dev))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step, (x, y, off) in enumerate(batches([(9, 7)] * 3, seed=5)):
        sl = slice(off[rank], off[rank + 1])
        xr, yr = x[sl].to(dev), y[sl].to(dev)
        torch.cuda.synchronize()
        # the first steps compile kernels, build DDP's buckets and fill caches (may sync)
        if step == 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            ((model(xr) - yr) ** 2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return True


def _stats_comm_worker(rank, world, interpret):
    import torch.distributed as dist

    seen = []

    def spy(fn):
        def wrapped(*args, group=None, **kw):
            seen.append(group)
            return fn(*args, group=group, **kw)
        return wrapped

    names = [n for n in ("all_gather_single", "all_gather_into_tensor", "all_reduce") if hasattr(dist, n)]
    saved = {n: getattr(dist, n) for n in names}
    for n in names:
        setattr(dist, n, spy(saved[n]))
    try:
        model = tiny_model()
        for x, y, off in batches([(5, 4)] * 2, seed=7):
            sl = slice(off[rank], off[rank + 1])
            ((model(x[sl]) - y[sl]) ** 2).mean().backward()
    finally:
        for n in names:
            setattr(dist, n, saved[n])
    groups = {id(g): g for g in seen}
    (g,) = groups.values()
    return (len(seen), g is not dist.group.WORLD and g is not None,
            dist.get_process_group_ranks(g) == list(range(world)))


@pytest.mark.parametrize("interpret", [False, True], ids=["torch", "kernels"])
def test_sync_stats_run_on_their_own_communicator(interpret, monkeypatch):
    """With the default (world) group, the statistics' collectives run on one copy of the
    world group, made once for every layer and step: on the world group's communicator
    they would wait behind the gradient and parameter collectives DDP and FSDP2 issue."""
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # 2 layers x 2 steps x (one forward all-gather + one backward all-reduce)
    assert run_ranks(_stats_comm_worker, 2, interpret) == [(8, True, True)] * 2


def _stats_comm_lifetime_worker(rank, world):
    import gc
    import weakref

    import torch.distributed as dist

    from omni_moe.layers.router_stats import _stats_comm_group

    x, y, off = batches([(5, 4)], seed=7)[0]
    sl = slice(off[rank], off[rank + 1])
    ((tiny_model()(x[sl]) - y[sl]) ** 2).mean().backward()
    copy = weakref.ref(_stats_comm_group(dist.group.WORLD))
    reused = _stats_comm_group(dist.group.WORLD) is copy()
    dist.destroy_process_group()
    gc.collect()
    return reused, copy() is None


def test_sync_stats_communicator_goes_with_the_process_group():
    """The statistics' copy of the world group is made once and freed by
    destroy_process_group: the layer keeps no reference that would outlive it (gloo
    aborted the process at exit when one did)."""
    assert run_ranks(_stats_comm_lifetime_worker, 2) == [(True, True)] * 2


# ----------------------------------------------------------------------------- DDP
def tiny_model(sync=None):
    torch.manual_seed(3)
    return nn.Sequential(OmniMoE(make_cfg(sync, E=36, k=4)), nn.LayerNorm(H),
                         OmniMoE(make_cfg(sync, E=36, k=4)))


def _train(model, data, rank=None, steps=2, lr=0.05):
    """SGD steps on mean((model(x) - y)^2) of this rank's share; per-step gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    dev = next(model.parameters()).device
    hist = []
    for x, y, off in data[:steps]:
        sl = slice(off[rank], off[rank + 1]) if rank is not None else slice(None)
        loss = ((model(x[sl].to(dev)) - y[sl].to(dev)) ** 2).mean()
        loss.backward()
        hist.append({n: _cpu(p.grad) for n, p in _named(model)})
        opt.step()
        opt.zero_grad()
    return hist, {n: _cpu(p.detach()) for n, p in _named(model)}


def _cpu(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()


def _named(model):
    m = model.module if hasattr(model, "module") else model
    return m.named_parameters()


DDP_SIZES = [(10, 10), (10, 10)]


def _ddp_worker(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from omni_moe.distributed import data_parallel

    res = {}
    for sync in (None, False):
        model = DDP(tiny_model(sync))
        res[sync] = _train(model, batches(DDP_SIZES, seed=5), rank)
    model = data_parallel(tiny_model())
    assert model.gradient_as_bucket_view   # the helper's default: gradients in the buckets
    res["helper"] = _train(model, batches(DDP_SIZES, seed=5), rank)
    return res


def test_ddp_matches_single_process():
    """Plain DDP and ``data_parallel`` (gradients as bucket views): the gradients and
    parameters of one process on the concatenated batch, at every step."""
    results = run_ranks(_ddp_worker, 2)
    hist, params = _train(tiny_model(), batches(DDP_SIZES, seed=5))
    for rank, res in enumerate(results):
        for key in (None, "helper"):
            r_hist, r_params = res[key]
            for step, (rg, g) in enumerate(zip(r_hist, hist)):
                for name in g:
                    assert rel(rg[name], g[name]) <= 1e-5, f"rank {rank} {key} step {step} {name}"
            for name in params:
                assert rel(r_params[name], params[name]) <= 1e-5, f"rank {rank} {key} {name}"
        # Per-rank statistics (synchronisation off) give another model: the check above
        # is sensitive to it.
        worst = max(rel(res[False][0][0][n], hist[0][n]) for n in hist[0])
        assert worst > 1e-3


# ----------------------------------------------------------------------------- FSDP2
def _fsdp_worker(rank, world, param_dtype, device="cpu"):
    from torch.distributed.device_mesh import init_device_mesh

    from omni_moe.distributed import fully_shard_model

    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh(device, (world,))
    model = fully_shard_model(tiny_model().to(_dev(device, rank)), mesh, param_dtype=param_dtype)
    res = _train(model, batches(DDP_SIZES, seed=5), rank)
    # Between forward and backward the first layer is resharded (DTensor parameters), the
    # last keeps its gathered ones (plain tensors) for the backward that follows at once.
    x, y, off = batches(DDP_SIZES, seed=6)[0]
    out = model(x[off[rank]:off[rank + 1]].to(_dev(device, rank)))
    kept = [not isinstance(model[i].up_embed.weight, DTensor) for i in (0, 2)]
    out.sum().backward()
    assert kept == [False, True], kept
    # a lone layer as the FSDP root
    layer = fully_shard_model(tiny_model()[0].to(_dev(device, rank)), mesh, param_dtype=param_dtype)
    return res, _train(layer, batches(DDP_SIZES, seed=5), rank, steps=1)


@pytest.mark.parametrize("param_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_fsdp2_matches_single_process(param_dtype):
    """fully_shard on each OmniMoE layer and the model.  fp32: equal to one process.
    bf16 mixed precision: equal to one process computing with bf16 copies of the
    parameters (float32 master weights and gradient reduction), within bf16 rounding."""
    results = run_ranks(_fsdp_worker, 2, param_dtype)
    data = batches(DDP_SIZES, seed=5)
    train = _train if param_dtype is None else _train_bf16_reference
    tol = 1e-5 if param_dtype is None else 3e-2
    refs = (train(tiny_model(), data), train(tiny_model()[0], data, steps=1))
    for rank, res in enumerate(results):
        for (r_hist, r_params), (hist, params) in zip(res, refs):
            for step, (rg, g) in enumerate(zip(r_hist, hist)):
                for name in g:
                    assert rel(rg[name], g[name]) <= tol, f"rank {rank} step {step} {name}"
            for name in params:
                assert rel(r_params[name], params[name]) <= tol, f"rank {rank} {name}"


def _train_bf16_reference(model, data, steps=2, lr=0.05):
    """One process mirroring FSDP2's MixedPrecisionPolicy(bf16, reduce float32): forward
    and backward with bf16 copies of float32 master parameters, bf16 inputs."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    hist = []
    for x, y, _ in data[:steps]:
        low = copy.deepcopy(model).to(torch.bfloat16)
        loss = ((low(x.bfloat16()).float() - y) ** 2).mean()
        loss.backward()
        for (n, p), (_, q) in zip(model.named_parameters(), low.named_parameters()):
            p.grad = q.grad.float()
        # the bf16 copy's forward updated its running statistics; keep them
        for (n, b), (_, c) in zip(model.named_buffers(), low.named_buffers()):
            b.copy_(c)
        hist.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    return hist, {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- sharded expert tables
SHARD_SIZES = [(9, 5), (0, 7)]
# Table rows and each rank's share: E = 49; E = 51, a checkpoint count that is not a
# square (the 7 x 7 grid routes to rows 0..48 only, so rank 1 holds two unrouted rows).
SHARD_ROWS = {49: (25, 24), 51: (26, 25)}


def _shard_worker(rank, world, device="cpu"):
    from torch.distributed.device_mesh import init_device_mesh

    from omni_moe.distributed import data_parallel, shard_expert_tables

    mesh = init_device_mesh(device, (world,))
    dev = _dev(device, rank)
    runs = {}
    for E, rows in SHARD_ROWS.items():
        torch.manual_seed(0)
        layer = OmniMoE(make_cfg(E=E)).to(dev)
        shard_expert_tables(layer, mesh)
        assert layer.up_embed.weight.to_local().shape[0] == rows[rank]
        model = data_parallel(layer)
        # DTensor tables in their own group: CUDA's default foreach step cannot mix them
        # with plain tensors.
        opt = torch.optim.SGD(param_groups(layer, lr=0.1), lr=0.1)
        outs = []
        for x, gout, off in batches(SHARD_SIZES):
            sl = slice(off[rank], off[rank + 1])
            xr = x[sl].to(dev).requires_grad_()
            out = model(xr)
            out.backward(gout[sl].to(dev))
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).cpu()
                     for n, p in layer.named_parameters()}
            outs.append((out.detach().cpu(), xr.grad.cpu(), grads))
            opt.step()
            opt.zero_grad()
        runs[E] = outs
    return runs


def test_sharded_expert_tables_match_single_process():
    """Row-sharded tables + DDP on the rest, unequal token counts (one rank empty): the
    outputs, input gradients and (averaged) parameter gradients of one process on the
    concatenated batch, over two SGD steps; a square and a non-square table."""
    _check_shard(run_ranks(_shard_worker, 2))


def _check_shard(results, device="cpu"):
    for E in SHARD_ROWS:
        torch.manual_seed(0)
        single = OmniMoE(make_cfg(E=E)).to(device)
        opt = torch.optim.SGD(single.parameters(), lr=0.1)
        P = 2
        for step, (x, gout, off) in enumerate(batches(SHARD_SIZES)):
            xs = x.to(device).requires_grad_()
            out = single(xs)
            # DDP averages over ranks: the ranks' update equals one process's on loss / P
            (out * gout.to(device)).sum().div(P).backward()
            for rank, r in enumerate(results):
                o, gx, grads = r[E][step]
                sl = slice(off[rank], off[rank + 1])
                where = f"E={E} rank {rank} step {step}"
                assert rel(o, out[sl]) <= 1e-5, f"{where}: output"
                assert rel(gx, xs.grad[sl] * P) <= 1e-5, f"{where}: input gradient"
                for n, p in single.named_parameters():
                    assert rel(grads[n], p.grad) <= 1e-5, f"{where}: {n}"
            assert not single.up_embed.weight.grad[49:].any(), f"E={E}: an unrouted row's gradient"
            opt.step()
            opt.zero_grad()


def test_shard_rejects_sparse_grad_and_bad_mesh():
    from omni_moe.distributed import shard_expert_tables

    class Mesh1D:
        ndim = 1

    class Mesh2D:
        ndim = 2

    layer = OmniMoE(make_cfg())
    with pytest.raises(ValueError, match="1-D"):
        shard_expert_tables(layer, Mesh2D())
    layer.config.sparse_expert_grad = True
    with pytest.raises(ValueError, match="sparse_expert_grad"):
        shard_expert_tables(layer, Mesh1D())
    layer.config.sparse_expert_grad = False
    layer.expert_sharding = object()
    with pytest.raises(ValueError, match="already sharded"):
        shard_expert_tables(layer, Mesh1D())
    with pytest.raises(ValueError, match="no OmniMoE"):
        shard_expert_tables(nn.Linear(2, 2), Mesh1D())


# ----------------------------------------------------------------------------- torchrun launch
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "train_tiny_lm.py")
TINY = ["--device", "cpu", "--steps", "3", "--d-model", "32", "--heads", "2", "--layers", "1",
        "--seq-len", "16", "--batch-size", "4", "--experts", "64", "--topk", "4",
        "--intermediate", "32", "--vocab", "16", "--fanout", "4", "--eval-every", "3",
        "--eval-batches", "1", "--warmup", "1"]


def _run_example(tmp_path, name, launcher):
    import json
    import subprocess
    import sys

    out = tmp_path / f"{name}.json"
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), ".."))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, *launcher, EXAMPLE, *TINY, "--json", str(out)]
    if name != "single":
        cmd += ["--parallel", name]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=JOIN_TIMEOUT_S)
    return json.loads(out.read_text())["models"]


@pytest.fixture(scope="module")
def single_example(tmp_path_factory):
    return _run_example(tmp_path_factory.mktemp("single"), "single", [])


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_torchrun_example_matches_single_process(tmp_path, kind, single_example):
    """``torchrun --nproc-per-node 2 examples/train_tiny_lm.py --parallel ddp|fsdp`` (gloo)
    trains both models to the single-process losses on the same global batches."""
    single = single_example
    par = _run_example(tmp_path, kind, ["-m", "torch.distributed.run", "--standalone",
                                        "--nproc-per-node", "2"])
    for name in ("omni_moe", "dense"):
        a, b = single[name], par[name]
        assert len(a["loss"]) == len(b["loss"]) == 3
        for la, lb in zip(a["loss"], b["loss"]):
            assert abs(la - lb) <= 1e-5 * abs(la), (name, a["loss"], b["loss"])
        assert abs(a["eval"][-1][1] - b["eval"][-1][1]) <= 1e-5 * abs(a["eval"][-1][1])
        assert a["params_total"] == b["params_total"]


# ----------------------------------------------------------------------------- two CUDA devices
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("check", ["sync_stats", "sharded_tables", "fsdp2"])
@pytest.mark.usefixtures("no_tf32")
def test_gpu_two_ranks(check, monkeypatch):
    """NCCL on cuda:0 and cuda:1 against one process on cuda:0: the router-norm kernels
    with synchronised statistics; row-sharded tables (masked out-of-range slots)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if check == "sync_stats":
        _check_against_single(run_ranks(_sync_worker, 2, False, "cuda", backend="nccl"), device="cuda")
    elif check == "sharded_tables":
        _check_shard(run_ranks(_shard_worker, 2, "cuda", backend="nccl"), device="cuda")
    else:
        results = run_ranks(_fsdp_worker, 2, None, "cuda", backend="nccl")
        hist, params = _train(tiny_model().cuda(), batches(DDP_SIZES, seed=5))
        for (r_hist, r_params), _ in results:
            for rg, g in zip(r_hist, hist):
                for name in g:
                    assert rel(rg[name], g[name]) <= 1e-5, name
            for name in params:
                assert rel(r_params[name], params[name]) <= 1e-5, name


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_gpu_ddp_step_has_no_host_sync(monkeypatch):
    """A DDP step (forward, backward with the gradient all-reduce, SGD step) of two
    OmniMoE layers with synchronised router statistics on the kernel path, NCCL on two
    GPUs, under ``torch.cuda.set_sync_debug_mode("error")``: no device->host sync."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert run_ranks(_ddp_sync_debug_worker, 2, backend="nccl") == [True, True]
