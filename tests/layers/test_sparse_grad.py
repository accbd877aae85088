"""Sparse expert gradients (``sparse_grad=True`` / ``OmniMoEConfig(sparse_expert_grad=True)``).

The sparse gradients must hold exactly the used experts' rows, each equal bit for bit to
the dense gradient's row (the same sums in the same order), match the float64 oracle
like the dense path, and train with the optimizers that take sparse gradients.
Kernel tests run the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1); the
PyTorch path is checked with the interpreter switched off.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import HAS_CUDA
from omni_moe import OmniMoE, OmniMoEConfig, omni_expert
from omni_moe.ops.expert.op import omni_expert_from_scores
from omni_moe.ops.expert.sparse import expert_groups, sparse_backward_impl
from omni_moe.ops.expert import kernels as kern
from test_expert import ACTS, check_against_float64, make_inputs, rel_l2
from router_checks import force_expert_schedule
from test_omni_moe_layer import assert_float32, cfg, train_and_compare

pytestmark = pytest.mark.usefixtures("no_tf32")


@pytest.fixture(params=["token", "expert"])
def mode(request, monkeypatch):
    force_expert_schedule(monkeypatch, request.param)
    yield request.param


def run(fn, h, up, down, w, idx, go, act, sparse, need=(True, True, True, True)):
    """(out, grads) with grads from torch.autograd.grad: what the op itself returns."""
    leaves = [x.detach().clone().requires_grad_(n) for x, n in zip((h, up, down, w), need)]
    out = fn(*leaves, idx, act, sparse_grad=sparse)
    wanted = [x for x in leaves if x.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, go))
    return out.detach(), [next(grads) if n else None for n in need]


def check_sparse(sp, dense, idx, num_experts):
    """sp is a coalesced COO tensor holding exactly the used experts' rows of dense."""
    assert sp.is_sparse and sp.layout == torch.sparse_coo
    assert sp.shape == dense.shape and sp.dtype == dense.dtype and sp.device == dense.device
    assert sp.is_coalesced()
    flat = idx.reshape(-1).long().cpu()
    used = torch.unique(flat[(flat >= 0) & (flat < num_experts)])
    assert torch.equal(sp.indices().cpu(), used.reshape(1, -1))
    assert sp.values().shape == (used.numel(), dense.shape[1])
    assert torch.equal(sp.values(), dense[used.to(dense.device)])
    assert torch.equal(sp.to_dense(), dense)


CASES = [
    # (T, H, E, k, kind)
    (7, 8, 9, 3, "random"),
    (33, 48, 64, 3, "skewed"),      # about half the experts unused
    (17, 300, 20, 2, "random"),     # H past one column block
    (9, 16, 400, 4, "distinct"),    # most experts unused
]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}_H{}_E{}_k{}_{}".format(*c))
def test_sparse_equals_dense_and_float64(case, dtype, path, mode):
    T, H, E, k, kind = case
    for call in range(3):  # consecutive calls, fresh inputs each
        act = ACTS[call]
        inputs = make_inputs(T, H, E, k, dtype, path, kind, seed=50 * call + T + E,
                             idx_dtype=(torch.int32, torch.int64)[call % 2])
        h, up, down, w, idx, go = inputs
        out_d, dense = run(omni_expert, *inputs, act, sparse=False)
        out_s, sparse = run(omni_expert, *inputs, act, sparse=True)
        assert torch.equal(out_s, out_d)
        assert torch.equal(sparse[0], dense[0]) and torch.equal(sparse[3], dense[3])
        for i in (1, 2):
            check_sparse(sparse[i], dense[i], idx, E)
        got = [out_s, sparse[0], sparse[1].to_dense(), sparse[2].to_dense(), sparse[3]]
        check_against_float64(*inputs, act, got)


def test_from_scores_and_partial_needs(path, mode):
    """exp fused (the layer's call); only some inputs need gradients."""
    h, up, down, w, idx, go = make_inputs(11, 24, 30, 3, torch.float32, path, "skewed", seed=4)
    s = w.float().log() - 0.5
    for need in ((True, True, True, True), (False, True, False, True), (True, False, True, False),
                 (True, False, False, True)):
        _, dense = run(omni_expert_from_scores, h, up, down, s, idx, go, "silu", False, need)
        _, sparse = run(omni_expert_from_scores, h, up, down, s, idx, go, "silu", True, need)
        for i, (a, b) in enumerate(zip(sparse, dense)):
            if not need[i]:
                assert a is None and b is None
            elif i in (1, 2):
                check_sparse(a, b, idx, 30)
            else:
                assert torch.equal(a, b)


@pytest.mark.parametrize("T,k", [(0, 3), (5, 0)])
def test_empty(T, k, path, mode):
    h, up, down, w, idx, go = make_inputs(T, 8, 6, k, torch.float32, path, seed=1)
    _, grads = run(omni_expert, h, up, down, w, idx, go, "silu", sparse=True)
    for g in grads[1:3]:
        assert g.is_sparse and g.shape == (6, 8) and g._nnz() == 0
    assert grads[0].shape == (T, 8) and not bool(grads[0].any())


def test_out_of_range_indices_skipped_by_kernels(device, mode):
    """Masked slots (CUDA semantics of out-of-range indices) get no gradient row."""
    T, H, E, k = 11, 24, 6, 3
    h, up, down, w, idx, go = make_inputs(T, H, E, k, torch.float32, device, seed=13)
    idx = idx.cpu()
    idx[0, 0], idx[3, 2], idx[5, 1], idx[10, 0] = -1, E, 2**40, -(2**40)
    idx = idx.to(device)
    out, a, se, perm = kern.expert_forward(h, up, down, w, idx, "silu")
    dense = kern.expert_backward(go, h, up, down, w, idx, a, se, perm, "silu")
    sparse = sparse_backward_impl(go, h, up, down, w, idx, a, se, perm, "silu", True, True, True)
    assert torch.equal(sparse[0], dense[0]) and torch.equal(sparse[3], dense[3])
    for i in (1, 2):
        check_sparse(sparse[i], dense[i], idx, E)


def test_expert_groups(device):
    keys = torch.tensor([-1, -1, 0, 0, 2, 5, 5, 5, 7, 7], dtype=torch.int16, device=device)
    rows, offsets = expert_groups(keys, 7)             # E = 7: key 7 is out of range
    assert rows.tolist() == [0, 2, 5] and rows.dtype == torch.int64
    assert offsets.tolist() == [2, 4, 5, 8] and offsets.dtype == torch.int32
    rows, offsets = expert_groups(keys[2:8].to(torch.int32), 7)
    assert rows.tolist() == [0, 2, 5] and offsets.tolist() == [0, 2, 3, 6]
    rows, offsets = expert_groups(keys[:0], 7)
    assert rows.numel() == 0 and offsets.tolist() == [0]


def test_bad_flag():
    h, up, down, w, idx, _ = make_inputs(4, 8, 5, 2, torch.float32, "cpu", seed=0)
    with pytest.raises(TypeError, match="sparse_grad"):
        omni_expert(h, up, down, w, idx, sparse_grad=1)
    with pytest.raises(TypeError, match="sparse_expert_grad"):
        cfg_kw = dict(hidden_size=8, intermediate_size=8, num_experts=4, num_experts_per_token=2)
        OmniMoEConfig(**cfg_kw, sparse_expert_grad="yes")


# --------------------------------------------------------------------------- the layer

class _Both:
    """SparseAdam for the expert tables, Adam for the rest: one ``step``/``zero_grad``."""

    def __init__(self, layer, lr=3e-3):
        tables = [layer.up_embed.weight, layer.down_embed.weight]
        rest = [p for p in layer.parameters() if all(p is not t for t in tables)]
        self.opts = [torch.optim.SparseAdam(tables, lr=lr), torch.optim.Adam(rest, lr=lr)]

    def step(self):
        for o in self.opts:
            o.step()

    def zero_grad(self):
        for o in self.opts:
            o.zero_grad()


def sparse_cfg(**kw):
    c = cfg(**kw)
    c.sparse_expert_grad = True
    return c


@pytest.mark.parametrize("case", [
    (dict(H=32, I=48, E=64, k=4, act="silu", norm="batchnorm"), (2, 24, 32)),
    (dict(H=16, I=24, E=400, k=3, act="gelu", norm="none"), (30, 16)),   # most experts unused
])
def test_layer_three_sparse_adam_steps(path, case):
    """Three SparseAdam + Adam steps; forward and every gradient vs float64 each step."""
    c, shape = case
    layer_cfg = sparse_cfg(**c)
    results = train_and_compare(layer_cfg, shape, path, torch.float32, make_optimizer=_Both)
    assert_float32(results)


def test_layer_sparse_grads_equal_dense_sgd_steps(path):
    """Sparse and dense layers from the same weights: identical gradients (dense form)
    and, under plain SGD (which takes both layouts), the same weights after each step;
    unused expert rows are never touched by the sparse step."""
    torch.manual_seed(2)
    dense = OmniMoE(cfg(H=16, I=24, E=144, k=3)).to(path)
    sparse = copy.deepcopy(dense)
    sparse.up_embed.sparse = sparse.down_embed.sparse = True
    od = torch.optim.SGD(dense.parameters(), lr=0.1)
    osp = torch.optim.SGD(sparse.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        x = torch.randn(20, 16, generator=gen).to(path)
        before = sparse.up_embed.weight.detach().clone()
        outs = []
        for layer, opt in ((dense, od), (sparse, osp)):
            out, (_, idx) = layer(x, return_routing=True)
            out.square().sum().backward()
            outs.append((out, idx))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        idx = outs[1][1]
        for name in ("up_embed", "down_embed"):
            gd = getattr(dense, name).weight.grad
            gs = getattr(sparse, name).weight.grad
            assert gs.is_sparse and not gd.is_sparse
            assert torch.equal(gs.coalesce().indices().cpu(),
                               torch.unique(idx.reshape(-1).long().cpu()).reshape(1, -1))
            assert torch.equal(gs.to_dense(), gd), (step, name)
        for (n, p), (_, q) in zip(dense.named_parameters(), sparse.named_parameters()):
            if "embed" not in n:
                assert torch.equal(p.grad, q.grad), n
        od.step()
        osp.step()
        od.zero_grad()
        osp.zero_grad()
        for (n, p), (_, q) in zip(dense.named_parameters(), sparse.named_parameters()):
            assert rel_l2(q, p) <= 1e-7, (step, n)
        unused = torch.ones(144, dtype=torch.bool)
        unused[idx.reshape(-1).long().cpu()] = False
        after = sparse.up_embed.weight.detach()
        assert torch.equal(after[unused.to(path)], before[unused.to(path)])


def test_sparse_layer_refuses_compile():
    torch._dynamo.reset()
    layer = OmniMoE(sparse_cfg())
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="sparse expert gradients"):
        compiled(torch.randn(6, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA-graph capture needs CUDA")
def test_sparse_refuses_graph_capture():
    layer = OmniMoE(sparse_cfg()).cuda()
    x = torch.randn(64, 32, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(x).sum().backward()          # warm-up (kernels compiled, eager: fine)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="sparse expert gradients"):
        with torch.cuda.graph(g):
            layer(x).sum().backward()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="large sizes need CUDA")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [(512, 256, 4096, 16, "random"), (1024, 512, 65536, 32, "distinct"),
                                  (256, 128, 2**20, 16, "random")],
                         ids=lambda c: "T{}_H{}_E{}_k{}_{}".format(*c))
def test_large_gpu_sparse(case, dtype):
    T, H, E, k, kind = case
    for call in range(2):
        inputs = make_inputs(T, H, E, k, dtype, "cuda", kind, seed=call)
        _, dense = run(omni_expert, *inputs, ACTS[call], sparse=False)
        out, sparse = run(omni_expert, *inputs, ACTS[call], sparse=True)
        for i in (1, 2):
            check_sparse(sparse[i], dense[i], inputs[4], E)
        got = [out, sparse[0], sparse[1].to_dense(), sparse[2].to_dense(), sparse[3]]
        check_against_float64(*inputs, ACTS[call], got)
