"""Tests of the atomic-expert op: forward and every gradient against float64.

Kernel tests run the Triton kernels: on CUDA when present, else on CPU through Triton's
interpreter (TRITON_INTERPRET=1).  Run:
    TRITON_INTERPRET=1 python -m pytest -q tests/test_expert.py
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch

import omni_moe
from omni_moe import omni_expert
from omni_moe.ops.expert.op import check_expert_args
from omni_moe.ops.expert.cpu import expert_backward_reference, expert_forward_reference
from omni_moe.ops.expert.reference import expert_naive
from omni_moe.ops.expert import dense as dense_mod
from omni_moe.ops.expert import kernels as kern
from _expert_oracle import expert_oracle
from _tolerance import accumulation_bound, assert_close_ulps
from router_checks import force_expert_schedule

HAS_CUDA = torch.cuda.is_available()
ACTS = ("silu", "gelu", "relu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- inputs

def make_indices(T, k, E, kind, gen, dtype=torch.int64):
    """(T, k) indices in [0, E).

    random: uniform, duplicates possible within a row;  distinct: distinct per row
    (as the router returns; needs k <= E);  skewed: most pairs on a few hot experts,
    about half the experts unused.
    """
    if kind == "random":
        idx = torch.randint(0, E, (T, k), generator=gen)
    elif kind == "distinct":
        idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :k]
    elif kind == "skewed":
        hot = torch.randint(0, max(1, E // 4), (T, k), generator=gen)
        cold = torch.randint(0, max(1, E // 2), (T, k), generator=gen) * 2 % E
        idx = torch.where(torch.rand(T, k, generator=gen) < 0.7, hot, cold)
    else:
        raise ValueError(kind)
    return idx.to(dtype)


def make_inputs(T, H, E, k, dtypes, device, kind="random", seed=0, idx_dtype=torch.int64):
    """Fresh (h, up, down, w, idx, grad_out); dtypes = (h, up, down, w) dtypes or one."""
    if isinstance(dtypes, torch.dtype):
        dtypes = (dtypes,) * 4
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g)
    up = torch.randn(E, H, generator=g) / max(H, 1) ** 0.5 * 2.0
    down = torch.randn(E, H, generator=g)
    w = torch.rand(T, k, generator=g) + 0.05
    go = torch.randn(T, H, generator=g)
    idx = make_indices(T, k, E, kind, g, idx_dtype) if E > 0 else torch.zeros(T, k, dtype=idx_dtype)
    ts = [x.to(dt).to(device) for x, dt in zip((h, up, down, w), dtypes)]
    return (*ts, idx.to(device), go.to(dtypes[0]).to(device))


def rel_l2(x, ref):
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert x.shape == ref.shape
    assert not torch.isnan(x).any(), "NaN in result"
    den = ref.norm().item()
    num = (x - ref).norm().item()
    if den == 0.0:
        return num
    return num / den


def run_op(h, up, down, w, idx, go, act, fn=omni_expert):
    leaves = [x.detach().clone().requires_grad_() for x in (h, up, down, w)]
    out = fn(*leaves, idx, act)
    out.backward(go)
    return [out.detach()] + [x.grad for x in leaves]


def run_naive(h, up, down, w, idx, go, act, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (h, up, down, w)]
    out = expert_naive(*leaves, idx, act)
    out.backward(go.to(dtype))
    return [out.detach()] + [x.grad for x in leaves]


NAMES = ("out", "d_hidden", "d_up", "d_down", "d_routing")


def check_against_float64(h, up, down, w, idx, go, act, got, fp32_tol=None):
    """Every result vs the float64 oracle, element by element: within half an ulp of
    its dtype (one rounding of a float32 result) plus twice the float32 error budget
    (``_expert_oracle``).  ``fp32_tol`` is accepted for old callers and unused."""
    assert got[0].dtype == h.dtype and got[0].shape == h.shape
    for g, x in zip(got[1:], (h, up, down, w)):
        assert g.dtype == x.dtype and g.shape == x.shape
    want, mag, n_ops = expert_oracle(h, up, down, w, idx, go, act)
    dtypes = [h.dtype, h.dtype, up.dtype, down.dtype, w.dtype]
    for i, name in enumerate(NAMES):
        assert_close_ulps(got[i], want[i], 0.5, dtypes[i], 2 * accumulation_bound(n_ops, mag[i]), name)


# --------------------------------------------------------------------------- correctness

@pytest.fixture(params=["token", "expert", "rows", "dense"])
def mode(request, monkeypatch):
    """Every schedule of the kernels, forced through the op's launch rule.  "dense" takes
    bfloat16 h, u and v only (other dtypes run the "expert" schedule, tested as such):
    tests of other dtypes skip it.  It runs with its weight gradients as GEMMs
    (``dense_weight_grads``); by sorted pairs they are the other schedules' kernel."""
    params = getattr(request.node, "callspec", None)
    dtype = params.params.get("dtype") if params is not None else None
    if request.param == "dense" and dtype is not None and dtype != torch.bfloat16:
        pytest.skip("the dense schedule takes bfloat16 only")
    extra = {"dense_weight_grads": True} if request.param == "dense" else {}
    force_expert_schedule(monkeypatch, request.param, **extra)
    yield request.param


CASES = [
    # (T, H, E, k, kind)
    (1, 8, 4, 1, "random"),
    (7, 8, 9, 3, "random"),
    (7, 48, 64, 3, "distinct"),
    (33, 48, 9, 8, "random"),       # k close to E, many duplicates within rows
    (33, 8, 64, 8, "distinct"),
    (33, 48, 64, 3, "skewed"),
    (17, 300, 20, 2, "random"),     # H above one column block, not a power of two
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}_H{}_E{}_k{}_{}".format(*c))
def test_matches_float64_three_calls(case, dtype, device, mode):
    T, H, E, k, kind = case
    for call in range(3):  # consecutive calls, fresh inputs each
        act = ACTS[(call + len(kind)) % 3]
        inputs = make_inputs(T, H, E, k, dtype, device, kind, seed=100 * call + T + H + E + k,
                             idx_dtype=(torch.int32, torch.int64)[call % 2])
        got = run_op(*inputs, act)
        check_against_float64(*inputs, act, got)


@pytest.mark.parametrize("act", ACTS)
def test_activations_float32(act, device):
    for call in range(3):
        inputs = make_inputs(33, 48, 9, 3, torch.float32, device, "random", seed=7 + call)
        check_against_float64(*inputs, act, run_op(*inputs, act))


@pytest.mark.parametrize("dtypes", [
    (torch.bfloat16, torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float16, torch.float16, torch.float16, torch.float32),
], ids=["h_bf16", "weights_bf16", "w_fp32"])
def test_mixed_dtypes(dtypes, device, mode):
    inputs = make_inputs(9, 48, 9, 3, dtypes, device, "random", seed=3)
    check_against_float64(*inputs, "silu", run_op(*inputs, "silu"))


@pytest.mark.parametrize("shape", [(0, 8, 4, 3), (5, 8, 4, 0), (0, 8, 0, 2), (4, 0, 3, 2)],
                         ids=["T0", "k0", "T0_E0", "H0"])
def test_empty(shape, device, mode):
    T, H, E, k = shape
    inputs = make_inputs(T, H, E, k, torch.float32, device, "random", seed=1)
    h, up, down, w, idx, go = inputs
    got = run_op(*inputs, "gelu")
    assert got[0].shape == (T, H) and torch.equal(got[0], torch.zeros(T, H, device=device))
    for g, x in zip(got[1:], (h, up, down, w)):
        assert g.shape == x.shape and not torch.isnan(g).any()
        assert torch.equal(g, torch.zeros_like(g))


def test_non_contiguous(device, mode):
    T, H, E, k = 13, 40, 11, 3
    g = torch.Generator().manual_seed(5)
    h = torch.randn(H, T, generator=g).to(device).t()                    # column-major
    big = (torch.randn(E, 3 * H, generator=g) / H ** 0.5).to(device)
    up = big[:, H:2 * H]                                                 # row stride 3H
    down = torch.randn(H, E, generator=g).to(device).t()                 # column-major
    w = (torch.rand(k, T, generator=g) + 0.1).to(device).t()
    idx = torch.randint(0, E, (k, T), generator=g).to(torch.int32).to(device).t()
    go = torch.randn(2 * T, H, generator=g).to(device)[::2]              # every other row
    assert not any(x.is_contiguous() for x in (h, up, down, w, idx, go))
    got = run_op(h, up, down, w, idx, go, "silu")
    check_against_float64(h, up, down, w, idx, go, "silu", got)


def test_only_some_inputs_need_grad(device, mode):
    h, up, down, w, idx, go = make_inputs(9, 16, 7, 2, torch.float32, device, seed=11)
    full = run_op(h, up, down, w, idx, go, "silu")
    for which in range(4):
        leaves = [x.detach().clone().requires_grad_(i == which) for i, x in enumerate((h, up, down, w))]
        out = omni_expert(*leaves, idx, "silu")
        out.backward(go)
        for i, x in enumerate(leaves):
            if i == which:
                assert torch.allclose(x.grad, full[1 + i], rtol=1e-6, atol=1e-6)
            else:
                assert x.grad is None
    with torch.no_grad():
        out = omni_expert(h, up, down, w, idx, "silu")
    assert torch.allclose(out, full[0])


def test_custom_op_path_matches_eager_path(device, mode):
    """omni_expert runs an autograd.Function eagerly and the custom ops under
    torch.compile; both call the same implementation: identical bits, at either
    precision."""
    inputs = make_inputs(13, 24, 9, 3, torch.bfloat16, device, "random", seed=23)
    for precision in ("exact", "bfloat16"):
        eager = run_op(*inputs, "silu", fn=partial(omni_expert, precision=precision))
        via_op = run_op(*inputs, "silu", fn=lambda *a: torch.ops.omni_moe.expert_forward(
            *a, False, precision)[0])
        for x, y in zip(eager, via_op):
            assert torch.equal(x, y), precision
    # A .sum() loss hands the backward an expanded (stride-0) gradient.
    h, up, down, w, idx, _ = inputs
    leaves = [x.detach().clone().requires_grad_() for x in (h, up, down, w)]
    omni_expert(*leaves, idx, "silu").float().sum().backward()
    ones = run_op(h, up, down, w, idx, torch.ones_like(h), "silu")
    for x, y in zip(leaves, ones[1:]):
        assert torch.equal(x.grad, y)


def test_deterministic(device, mode):
    inputs = make_inputs(33, 48, 9, 8, torch.bfloat16, device, "skewed", seed=21)
    first = run_op(*inputs, "silu")
    for _ in range(2):
        again = run_op(*inputs, "silu")
        for x, y in zip(first, again):
            assert torch.equal(x, y)


def test_reference_path_matches_float64():
    """The plain-CPU PyTorch path (``cpu.py``: forward + explicit backward formula)."""
    for call, act in enumerate(ACTS):
        h, up, down, w, idx, go = make_inputs(17, 24, 10, 4, torch.float32, "cpu", "random", seed=call)
        out, a = expert_forward_reference(h, up, down, w, idx, act)
        grads = expert_backward_reference(go, h, up, down, w, idx, a, act)
        check_against_float64(h, up, down, w, idx, go, act, [out, *grads])


@pytest.mark.parametrize("sparse", [False, True], ids=["dense_grads", "sparse_grads"])
def test_reference_path_in_token_chunks(sparse, monkeypatch, torch_path):
    """The PyTorch path builds its (tokens, k, H) temporaries a chunk of tokens at a time:
    with chunks of one and of three tokens (the last one short) out and every gradient
    against float64 and against one chunk."""
    from omni_moe.ops.expert import cpu

    h, up, down, w, idx, go = make_inputs(11, 24, 10, 4, torch.float32, "cpu", "random", seed=8)
    fn = lambda *a: omni_expert(*a, sparse_grad=sparse)
    whole = run_op(h, up, down, w, idx, go, "gelu", fn=fn)
    assert cpu.token_chunks(11, 4, 24) == [slice(0, 11)] and cpu.token_chunks(0, 4, 24) == [slice(0, 0)]
    for tokens in (1, 3):
        monkeypatch.setattr(cpu, "_CHUNK_BYTES", 2 * 4 * 24 * 4 * tokens)
        assert len(cpu.token_chunks(11, 4, 24)) == -(-11 // tokens)
        got = run_op(h, up, down, w, idx, go, "gelu", fn=fn)
        got = [g.to_dense() if g.is_sparse else g for g in got]
        check_against_float64(h, up, down, w, idx, go, "gelu", got)
        for x, y in zip(got, whole):
            y = y.to_dense() if y.is_sparse else y
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- launchers: poison, ranges

def _poison(t):
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(-1)


def test_poisoned_outputs(device, mode):
    T, H, E, k = 21, 40, 64, 3   # 63 pairs over 64 experts: many unused rows
    h, up, down, w, idx, go = make_inputs(T, H, E, k, torch.bfloat16, device, "random", seed=9)
    w = w.float()
    act = "gelu"
    out, a, se, perm = kern.expert_forward(h, up, down, w, idx, act)
    out_p = _poison(torch.empty_like(out))
    a_p = _poison(torch.empty_like(a))
    kern.expert_forward(h, up, down, w, idx, act, out=out_p, a=a_p)
    assert torch.equal(out_p, out) and torch.equal(a_p, a)
    grads = kern.expert_backward(go, h, up, down, w, idx, a, se, perm, act)
    poisoned = [_poison(torch.empty_like(g)) for g in grads]
    got = kern.expert_backward(go, h, up, down, w, idx, a, se, perm, act,
                               dh=poisoned[0], dup=poisoned[1], ddown=poisoned[2], dw=poisoned[3])
    used = torch.zeros(E, dtype=torch.bool, device=device)
    used[idx.long().reshape(-1)] = True
    assert not used.all()
    for g, p, ref in zip(got, poisoned, grads):
        assert g is p and torch.equal(p, ref)
    assert torch.equal(got[1][~used], torch.zeros_like(got[1][~used]))
    assert torch.equal(got[2][~used], torch.zeros_like(got[2][~used]))
    check_against_float64(h, up, down, w, idx, go, act, [out, *got])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d).split(".")[-1])
def test_non_finite_inputs(dtype, device, mode):
    """NaN of both signs, +-inf and subnormals in h, u and v: a, out, dw, dh, du and dv
    carry NaN and inf exactly where the float64 formula does, finite entries agree."""
    T, H, E, k = 19, 40, 36, 5
    h, up, down, w, idx, go = make_inputs(T, H, E, k, dtype, device, "distinct", seed=11)
    w = w.float()
    tiny = torch.finfo(dtype).tiny / 4                     # subnormal in both dtypes
    h[0, 3], h[1, 0], h[2, 5], h[3, 7] = float("nan"), -float("nan"), float("inf"), tiny
    e0, e1 = int(idx[4, 1]), int(idx[5, 2])
    up[e0, 9], up[e1, 1] = -float("inf"), -tiny
    down[int(idx[6, 0]), 2] = float("nan")
    out, a, se, perm = kern.expert_forward(h, up, down, w, idx, "silu")
    dh, dup, ddown, dw = kern.expert_backward(go, h, up, down, w, idx, a, se, perm, "silu")
    idx64 = idx.long().cpu()
    hd, ud, vd, wd, god = (t.detach().cpu().double() for t in (h, up, down, w, go))
    a_ref = torch.einsum("th,tkh->tk", hd, ud[idx64])
    z = torch.nn.functional.silu(a_ref)
    out_ref = torch.einsum("tk,tkh->th", z * wd, vd[idx64])
    g_ref = torch.einsum("th,tkh->tk", god, vd[idx64])
    dw_ref = z * g_ref
    sig = torch.sigmoid(a_ref)
    da_ref = sig * (1 + a_ref * (1 - sig)) * wd * g_ref
    dh_ref = torch.einsum("tk,tkh->th", da_ref, ud[idx64])
    flat = idx64.reshape(-1)
    du_ref = torch.zeros(E, H, dtype=torch.float64).index_add_(
        0, flat, (da_ref[:, :, None] * hd[:, None, :]).reshape(-1, H))
    dv_ref = torch.zeros(E, H, dtype=torch.float64).index_add_(
        0, flat, ((z * wd)[:, :, None] * god[:, None, :]).reshape(-1, H))
    low = 1e-2 if dtype != torch.float32 else 1e-5
    for name, got, ref, tol in (("a", a, a_ref, 1e-5), ("out", out, out_ref, low),
                                ("dw", dw, dw_ref, 1e-5), ("dh", dh, dh_ref, low),
                                ("du", dup, du_ref, low), ("dv", ddown, dv_ref, low)):
        got = got.detach().cpu().double()
        assert torch.equal(got.isnan(), ref.isnan()), name
        assert torch.equal(got == float("inf"), ref == float("inf")), name
        assert torch.equal(got == -float("inf"), ref == -float("inf")), name
        fin = ref.isfinite()
        assert fin.sum() > 0.5 * fin.numel(), name
        torch.testing.assert_close(got[fin], ref[fin], rtol=tol, atol=tol * ref[fin].abs().max().item())


@pytest.mark.parametrize("cfg", [(2, 16, 3, 4), (8, 64, 1, 4), (1, 32, 2, 2), (2, 16, 2, 4, 4), (1, 64, 2, 4, 3)],
                         ids=str)
def test_expert_grad_tilings_same_bits(cfg, device, mode, monkeypatch):
    """The expert-gradient kernel sums each expert's pairs one at a time in sorted
    order, whatever its tiling (a 5th entry: experts per program): identical bits."""
    inputs = make_inputs(21, 40, 9, 3, torch.float32, device, "skewed", seed=4)
    ref = run_op(*inputs, "gelu")
    force_expert_schedule(monkeypatch, expert_grad=kern.Tile(*cfg))
    got = run_op(*inputs, "gelu")
    for x, y in zip(got, ref):
        assert torch.equal(x, y)


@pytest.mark.parametrize("tile", [(16, 16, 16, 16), (32, 16, 32, 64), (16, 32, 16, 32)], ids=str)
def test_rows_kernel_tilings(tile, device, monkeypatch):
    """The rows schedule with several column blocks per grid row (N = 40), work items
    that span grid rows, several H steps and pair chunks: every result against float64."""
    T, H, E, k = 37, 48, 1600, 45
    inputs = make_inputs(T, H, E, k, torch.float32, device, "distinct", seed=21)
    force_expert_schedule(monkeypatch, "rows", rows=kern.RowTile(*tile, warps=4, stages=2,
                                                                 progs_per_sm=1))
    got = run_op(*inputs, "silu")
    check_against_float64(*inputs, "silu", got)


@pytest.mark.parametrize("cfg", [(2, 16, 2, 4), (1, 16, 3, 4), (4, 64, 1, 4), (8, 32, 2, 2)], ids=str)
def test_token_kernel_tilings(cfg, device, monkeypatch):
    """Other (BLOCK_T, BLOCK_H, UNROLL, warps) of the token kernels, including the
    two-phase path (H > BLOCK_H: dots by column chunks, a CTA barrier, then the sums):
    every result matches float64, also with unused and out-of-range slots."""
    force_expert_schedule(monkeypatch, "token", token=kern.Tile(*cfg))
    for call, (T, H, E, k, kind) in enumerate([(13, 40, 9, 3, "random"), (9, 33, 64, 5, "skewed")]):
        act = ACTS[call + 1]
        inputs = make_inputs(T, H, E, k, torch.float32, device, kind, seed=31 + call,
                             idx_dtype=(torch.int32, torch.int64)[call])
        check_against_float64(*inputs, act, run_op(*inputs, act))
        inputs = make_inputs(T, H, E, k, torch.bfloat16, device, kind, seed=41 + call)
        check_against_float64(*inputs, act, run_op(*inputs, act))
    # poisoned outputs and an out-of-range slot on the two-phase path
    h, up, down, w, idx, go = make_inputs(11, 40, 6, 3, torch.float32, device, seed=5)
    idx = idx.clone()
    idx[2, 1] = -1
    idx[7, 0] = 6
    out_p = _poison(torch.empty(11, 40, device=device))
    a_p = _poison(torch.empty(11, 3, device=device))
    out, a, se, perm = kern.expert_forward(h, up, down, w, idx, "silu", out=out_p, a=a_p)
    got = kern.expert_backward(go, h, up, down, w, idx, a, se, perm, "silu",
                               dh=_poison(torch.empty_like(h)), dup=_poison(torch.empty_like(up)),
                               ddown=_poison(torch.empty_like(down)), dw=_poison(torch.empty_like(w)))
    assert a[2, 1] == 0 and a[7, 0] == 0 and got[3][2, 1] == 0 and got[3][7, 0] == 0
    w0 = w.clone()
    w0[2, 1] = w0[7, 0] = 0.0
    idx0 = idx.clamp(0, 5)
    ref = run_naive(h, up, down, w0, idx0, go, "silu", torch.float64)
    for x, y in zip([out, *got[:3]], ref[:4]):
        assert rel_l2(x, y) <= 1e-5


@pytest.mark.parametrize("cfg", [(1, 64, 2, 4, 1, 3), (2, 64, 2, 4, 1, 7), (1, 16, 3, 4, 1, 4), (4, 32, 2, 2, 1, 45),
                                 (1, 64, 1, 4, 1, 60)], ids=str)
def test_token_forward_split(cfg, device, monkeypatch):
    """The token forward with the slots cut into chunks (decode batches): uneven last
    chunks, more chunks than slots, the two-phase path (H > BLOCK_H), bf16, float32 and
    bf16 activations with float32 tables (autocast over float32 weights), unused and
    out-of-range slots, poisoned outputs; every result against float64, the
    same bits on every call."""
    tile = kern.Tile(*cfg)
    force_expert_schedule(monkeypatch, "token", token=tile)
    for call, (T, H, E, k, dtype) in enumerate([(1, 40, 300, 45, torch.float32), (3, 33, 64, 23, torch.bfloat16),
                                                 (2, 40, 90, 31, (torch.bfloat16, torch.float32, torch.float32,
                                                                  torch.float32))]):
        inputs = make_inputs(T, H, E, k, dtype, device, "distinct", seed=61 + call)
        got = run_op(*inputs, ACTS[call])
        check_against_float64(*inputs, ACTS[call], got)
        assert all(torch.equal(x, y) for x, y in zip(got, run_op(*inputs, ACTS[call])))
    h, up, down, w, idx, go = make_inputs(2, 40, 50, 30, torch.float32, device, "distinct", seed=7)
    idx = idx.clone()
    idx[0, 4], idx[1, 29] = -1, 50
    cfg = replace(kern.default_config(2, 40, 50, 30, 4), schedule="token", token=tile)
    out, a, _, _ = kern.expert_forward(h, up, down, w, idx, "silu", out=_poison(torch.empty(2, 40, device=device)),
                                       a=_poison(torch.empty(2, 30, device=device)), config=cfg)
    assert a[0, 4] == 0 and a[1, 29] == 0
    w0 = w.clone()
    w0[0, 4] = w0[1, 29] = 0.0
    ref = run_naive(h, up, down, w0, idx.clamp(0, 49), go, "silu", torch.float64)
    assert rel_l2(out, ref[0]) <= 1e-6
    a_ref = torch.einsum("th,tkh->tk", h.double().cpu(), up.double().cpu()[idx.clamp(0, 49).cpu()])
    a_ref[0, 4] = a_ref[1, 29] = 0.0
    assert rel_l2(a, a_ref) <= 1e-6


def test_token_split_rule():
    """Chunks only for k >= 128 and fewer than 8 token blocks a multiprocessor: enough
    for 8 programs a multiprocessor and at most 128 slots a chunk, never under 8 slots
    a chunk nor over 2 chunks a multiprocessor; unknown device: none.  Decode batches
    take the token schedule.  The chunk sum's column width: about 256 programs."""
    split = lambda T, H, K, sms: kern.default_config(T, H, 65536, K, 2, sms).token.split
    assert split(1, 1024, 3072, 132) == 264 and split(1, 1024, 3072, 66) == 132
    assert split(8, 1024, 3072, 132) == 132
    assert split(64, 1024, 3072, 132) == 24
    assert split(256, 1024, 3072, 132) == 24
    assert split(64, 1024, 512, 132) == 17
    assert split(1, 1024, 512, 132) == 64 and split(8, 1024, 512, 132) == 64
    assert split(1, 1024, 16, 132) == split(1, 1024, 127, 132) == 1
    assert split(1056, 1024, 3072, 132) == split(4096, 1024, 3072, 132) == 1
    assert split(1, 1024, 3072, 0) == 1
    assert kern.default_config(1, 1024, 65536, 3072, 2).token.split == 1
    assert kern.choose_mode(64, 1024, 65536, 3072, 2) == "token"
    assert kern.choose_mode(65, 1024, 65536, 3072, 2) == "expert"
    assert [kern._sum_width(T, 1024) for T in (1, 8, 16, 64, 4096)] == [32, 32, 64, 256, 256]
    assert kern._sum_width(1, 8) == 16 and kern._sum_width(256, 100) == 128


def test_token_split_default_rule(device):
    """The op's own rule splits a decode-sized call (the interpreter counts 2
    multiprocessors): results against float64."""
    T, H, E, k = 1, 24, 400, 200
    assert kern.default_config(T, H, E, k, 4, 2).token.split > 1
    inputs = make_inputs(T, H, E, k, torch.float32, device, "distinct", seed=71)
    check_against_float64(*inputs, "silu", run_op(*inputs, "silu"))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=["fp32", "bf16"])
def test_from_scores(dtype, device, mode):
    """omni_expert_from_scores(s) == omni_expert(exp(s)) with the exp fused; the
    gradient it returns is that of the scores (d s = exp(s) d w)."""
    from omni_moe.ops.expert.op import omni_expert_from_scores

    h, up, down, w, idx, go = make_inputs(17, 24, 10, 4, dtype, device, "random", seed=3)
    s = (w.float().log() - 0.5).to(torch.float32)   # fp32 log-probabilities, as the router's
    for act in ACTS:
        got = run_op(h, up, down, s, idx, go, act, fn=omni_expert_from_scores)
        # float64 oracle of the composition
        leaves = [x.detach().double().requires_grad_() for x in (h, up, down, s)]
        ref_out = expert_naive(leaves[0], leaves[1], leaves[2], leaves[3].exp(), idx, act)
        ref_out.backward(go.double())
        ref = [ref_out] + [x.grad for x in leaves]
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for i, (x, y) in enumerate(zip(got, ref)):
            assert x.dtype == (h.dtype, h.dtype, up.dtype, down.dtype, s.dtype)[i]
            assert rel_l2(x, y) <= tol, (act, i, rel_l2(x, y))
        # torch.compile path (custom ops): the same bits as the eager path
        via_op = run_op(h, up, down, s, idx, go, act,
                        fn=lambda *a: torch.ops.omni_moe.expert_forward(*a, True)[0])
        for x, y in zip(got, via_op):
            assert torch.equal(x, y)


def test_out_of_range_indices_masked_by_kernels(device, mode):
    """The launchers never read outside the weights; bad slots contribute nothing."""
    T, H, E, k = 11, 24, 6, 3
    h, up, down, w, idx, go = make_inputs(T, H, E, k, torch.float32, device, seed=13)
    bad = torch.zeros(T, k, dtype=torch.bool)
    bad[0, 0] = bad[3, 2] = bad[5, 1] = bad[10, 0] = True
    vals = torch.tensor([-1, E, 2**40, -(2**40)])
    idx_bad = idx.clone().cpu()
    idx_bad[bad] = vals
    idx_bad = idx_bad.to(device)
    out, a, se, perm = kern.expert_forward(h, up, down, w, idx_bad, "silu",
                                           out=_poison(torch.empty_like(h)),
                                           a=_poison(torch.empty(T, k, device=device)))
    dh, dup, ddown, dw = kern.expert_backward(go, h, up, down, w, idx_bad, a, se, perm, "silu",
                                              dw=_poison(torch.empty_like(w)))
    assert torch.equal(a[bad.to(device)], torch.zeros(int(bad.sum()), device=device))
    # Reference: the same pairs with zero routing weight and an in-range index.
    w0 = w.clone()
    w0[bad.to(device)] = 0.0
    idx0 = torch.where(bad.to(device), torch.zeros_like(idx), idx)
    ref = run_naive(h, up, down, w0, idx0, go, "silu", torch.float64)
    assert rel_l2(out, ref[0]) <= 1e-5
    assert rel_l2(dh, ref[1]) <= 1e-5
    assert rel_l2(dup, ref[2]) <= 1e-5
    assert rel_l2(ddown, ref[3]) <= 1e-5
    good = ~bad.to(device)
    assert rel_l2(dw[good], ref[4][good]) <= 1e-5
    assert torch.equal(dw[~good], torch.zeros_like(dw[~good]))
    # int32 indices: the same.
    out32 = kern.expert_forward(h, up, down, w, idx_bad.clamp(-5, E + 5).to(torch.int32), "silu")[0]
    assert torch.equal(out32, out)


def test_out_of_range_indices_raise_on_cpu():
    h, up, down, w, idx, go = make_inputs(5, 8, 4, 2, torch.float32, "cpu", seed=2)
    for v in (-1, 4):
        bad = idx.clone()
        bad[2, 1] = v
        with pytest.raises(ValueError, match="indices"):
            omni_expert(h, up, down, w, bad)


def test_grouping_helpers(device):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 10, (13, 4), generator=g).to(device)
    se, perm = kern.group_pairs(idx, 10)
    flat = idx.reshape(-1)
    assert torch.equal(flat[perm].to(torch.int32), se.to(torch.int32))
    assert bool((se[1:] >= se[:-1]).all())
    same = se[1:] == se[:-1]
    assert bool((perm[1:][same] > perm[:-1][same]).all()), "not stable"
    off = kern.expert_offsets(se, 10).cpu()
    counts = torch.bincount(flat.cpu(), minlength=10)
    assert torch.equal(off[1:] - off[:-1], counts.to(off.dtype)) and off[0] == 0


# --------------------------------------------------------------------------- API

def test_exported():
    assert omni_moe.omni_expert is omni_expert
    assert "omni_expert" in omni_moe.__all__


def test_bad_inputs():
    h, up, down, w, idx, _ = make_inputs(4, 8, 5, 2, torch.float32, "cpu", seed=0)
    good = dict(hidden_states=h, up_weights=up, down_weights=down, routing_weights=w, indices=idx)

    def call(**kw):
        args = dict(good)
        act = kw.pop("act", "silu")
        precision = kw.pop("precision", "exact")
        args.update(kw)
        return omni_expert(args["hidden_states"], args["up_weights"], args["down_weights"],
                           args["routing_weights"], args["indices"], act, precision=precision)

    cases = [
        (TypeError, "hidden_states", dict(hidden_states=h.numpy())),
        (ValueError, "hidden_states", dict(hidden_states=h[0])),
        (TypeError, "hidden_states", dict(hidden_states=h.double())),
        (TypeError, "up_weights", dict(up_weights=up.to(torch.int32))),
        (ValueError, "up_weights", dict(up_weights=up[:, :7])),
        (ValueError, "up_weights", dict(up_weights=up[None])),
        (ValueError, "down_weights", dict(down_weights=down[:4])),
        (TypeError, "routing_weights", dict(routing_weights=w.double())),
        (ValueError, "routing_weights", dict(routing_weights=w[:3])),
        (ValueError, "indices", dict(indices=idx[:, :1])),
        (TypeError, "indices", dict(indices=idx.float())),
        (TypeError, "indices", dict(indices=idx.to(torch.int16))),
        (ValueError, "indices", dict(indices=idx.to("meta"))),
        (ValueError, "down_weights", dict(down_weights=down.to("meta"))),
        (ValueError, "act", dict(act="tanh")),
        (TypeError, "act", dict(act=None)),
        (ValueError, "precision", dict(precision="float16")),
        (TypeError, "precision", dict(precision=None)),
    ]
    for exc, name, kw in cases:
        with pytest.raises(exc, match=name):
            call(**kw)
    check_expert_args(h, up, down, w, idx, "relu")  # the good case passes


def test_torch_compile_fullgraph(device):
    inputs = make_inputs(9, 16, 7, 3, torch.float32, device, seed=17)
    h, up, down, w, idx, go = inputs
    eager = run_op(*inputs, "gelu")

    def layer(h, up, down, w, idx):
        return omni_expert(h * 1.0, up, down, torch.exp(torch.log(w)), idx, act="gelu")

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        got = run_op(*inputs, "gelu", fn=lambda a, b, c, d, i, act: compiled(a, b, c, d, i))
        for x, y in zip(got, eager):
            assert torch.allclose(x, y, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- cost model

def test_floor_bytes():
    # (8192, 1024, 65536, 32) bf16: ~64.3K distinct experts -> ~251 MiB of weight rows.
    D = kern.expected_distinct_experts(8192, 32, 65536)
    assert 64000 < D < 64500
    fwd = kern.expert_floor_bytes(8192, 1024, 65536, 32, 2)
    assert fwd == pytest.approx(2 * D * 1024 * 2 + 2 * 8192 * 1024 * 2 + 8192 * 32 * 6)
    both = kern.expert_floor_bytes(8192, 1024, 65536, 32, 2, backward=True)
    sparse = kern.expert_floor_bytes(8192, 1024, 65536, 32, 2, backward=True, dense_weight_grads=False)
    assert both > sparse > 2 * fwd * 0.9
    assert kern.expert_floor_bytes(4, 8, 16, 2, 2, distinct=3) == 2 * 3 * 8 * 2 + 2 * 4 * 8 * 2 + 4 * 2 * 6


@pytest.mark.parametrize("tables", ["fp32", "bf16-dense"])
def test_autocast_leaves_the_op_unchanged(path, tables, monkeypatch):
    """The op's products and sums are float32 whatever autocast its caller runs: under
    ``torch.autocast(bf16)`` the output and every gradient are bitwise those without it
    (the PyTorch path's bmm and the dense schedule's GEMMs are ops autocast would recast;
    the backward runs under the same autocast here)."""
    if tables == "bf16-dense":
        force_expert_schedule(monkeypatch, "dense", dense_weight_grads=True)
        dtypes = (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32)
    else:
        dtypes = (torch.bfloat16, torch.float32, torch.float32, torch.float32)
    for call in range(2):
        inputs = make_inputs(24, 48, 70, 9, dtypes, path, "distinct", seed=call)
        plain = run_op(*inputs, ACTS[call])
        with torch.autocast(torch.device(path).type, dtype=torch.bfloat16):
            amp = run_op(*inputs, ACTS[call])
        for name, x, y in zip(NAMES, plain, amp):
            assert x.dtype == y.dtype and torch.equal(x, y), (name, call)


# --------------------------------------------------------------------------- dense schedule

@pytest.mark.parametrize("chunk,gemm_grads", [(0, True), (16, True), (33, True), (16, False)],
                         ids=("chunk0", "chunk16", "chunk33", "chunk16-pair-grads"))
def test_dense_chunks(chunk, gemm_grads, device, monkeypatch):
    """The dense schedule in one chunk of experts or several (a short last one), with
    duplicate experts in a token's slots (recomputed pair by pair), the weight gradients
    as GEMMs (the rule) or by sorted pairs: out and every gradient against float64, three
    calls on fresh inputs."""
    force_expert_schedule(monkeypatch, "dense", dense_chunk=chunk, dense_weight_grads=gemm_grads)
    for call in range(3):
        inputs = make_inputs(23, 40, 70, 9, torch.bfloat16, device, "random", seed=40 + call)
        assert (inputs[4][:, :, None] == inputs[4][:, None, :]).sum() > 23 * 9   # duplicates
        check_against_float64(*inputs, ACTS[call], run_op(*inputs, ACTS[call]))


@pytest.mark.parametrize("table", ["up", "down"])
def test_dense_non_finite_unused_expert(table, device, monkeypatch):
    """A NaN and an infinity in the u (or v) row of an expert no token routes to: the
    dense products multiply it by zeros, so every token is recomputed pair by pair and
    out and every gradient stay those of the float64 formula (which never reads it)."""
    force_expert_schedule(monkeypatch, "dense", dense_chunk=16, dense_weight_grads=True)
    h, up, down, w, idx, go = make_inputs(21, 40, 50, 6, torch.bfloat16, device, "distinct", seed=17)
    idx = torch.where(idx == 7, torch.full_like(idx, 8), idx)          # expert 7 unused
    t = up if table == "up" else down
    t[7, 3], t[7, 11] = float("nan"), -float("inf")
    got = run_op(h, up, down, w, idx, go, "gelu")
    assert all(torch.isfinite(g).all() for g in (got[0], got[1], got[4]))
    for g in got[2:4]:
        assert torch.equal(g[7], torch.zeros_like(g[7]))
        g[7] = 0
    check_against_float64(h, up.nan_to_num(0, 0, 0), down.nan_to_num(0, 0, 0), w, idx, go, "gelu", got)


def test_dense_infinite_row_with_zero_coefficients(device, monkeypatch):
    """An infinity in h whose pairs all get a = -inf, so that relu gives c = 0 and da = 0:
    nothing in the coefficients marks the token, yet du_e = sum da_p h_t holds
    0 * inf = NaN in that column for each of its experts (the float64 formula's pattern);
    the weight gradients as GEMMs must sum that token pair by pair."""
    force_expert_schedule(monkeypatch, "dense", dense_chunk=16, dense_weight_grads=True)
    T, H, E, k = 9, 16, 40, 4
    h, up, down, w, idx, go = make_inputs(T, H, E, k, torch.bfloat16, device, "distinct", seed=9)
    h[2, 5] = float("inf")
    up[idx[2].long(), 5] = -1.0                         # a[2, :] = -inf, relu: c = da = 0
    out, a, se, perm = kern.expert_forward(h, up, down, w, idx, "relu")
    assert torch.isneginf(a[2]).all()
    dh, dup, ddown, dw = kern.expert_backward(go, h, up, down, w, idx, a, se, perm, "relu")
    hd, wd, god = h.cpu().double(), w.cpu().double(), go.cpu().double()
    a_ref = a.cpu().double()
    z = a_ref.clamp(min=0)
    g_ref = torch.einsum("th,tkh->tk", god, down.cpu().double()[idx.cpu().long()])
    da_ref = (a_ref > 0).double() * wd * g_ref
    flat = idx.cpu().long().reshape(-1)
    du_ref = torch.zeros(E, H, dtype=torch.float64).index_add_(
        0, flat, (da_ref[:, :, None] * hd[:, None, :]).reshape(-1, H))
    dv_ref = torch.zeros(E, H, dtype=torch.float64).index_add_(
        0, flat, ((z * wd)[:, :, None] * god[:, None, :]).reshape(-1, H))
    assert du_ref.isnan().sum() == k
    for name, got, ref in (("du", dup, du_ref), ("dv", ddown, dv_ref)):
        got = got.cpu().double()
        assert torch.equal(got.isnan(), ref.isnan()) and torch.isfinite(got).sum() == ref.isfinite().sum(), name
        fin = ref.isfinite()
        torch.testing.assert_close(got[fin], ref[fin], rtol=1e-2, atol=1e-2 * ref[fin].abs().max().item())


def test_dense_coefficient_beyond_bfloat16(device):
    """A finite float32 coefficient too large for bfloat16 (its first part would be inf):
    the token is recomputed pair by pair and its output stays finite."""
    T, H, E, k = 5, 16, 40, 3
    h, up, down, w, idx, _ = make_inputs(T, H, E, k, torch.bfloat16, device, "distinct", seed=5)
    w = w.float()
    e = int(idx[0, 0])
    h[0] = 0
    h[0, 0] = 1
    up[e] = 0
    up[e, 0] = 1                                         # a = 1 exactly
    down[e] = down[e].clamp(-0.5, 0.5)
    w[0, 0] = 3.4e38                                     # c = 3.4e38 > bfloat16's max
    rule = kern.default_config(T, H, E, k, 2)
    dense, _, _, _ = kern.expert_forward(h, up, down, w, idx, "relu",
                                         config=replace(rule, schedule="dense"))
    ref, _, _, _ = kern.expert_forward(h, up, down, w, idx, "relu",
                                       config=replace(rule, schedule="expert"))
    assert torch.isfinite(ref).all() and ref[0].abs().max() > 1e37
    assert torch.equal(dense, ref)


def test_dense_rule():
    """The rule takes the dense schedule for bfloat16 h, u, v (and only then) when a token
    routes to at least 1/32 of the experts, past decode batches and L2-resident tables;
    its chunk rule keeps the scratch within 512 MiB; a negative ``dense_chunk`` is
    rejected."""
    E = 102400
    mode = lambda T, K, dtype=torch.bfloat16, H=1024: kern.choose_mode(T, H, E, K, 2, dtype)
    assert mode(4096, 3200) == mode(4096, 4096) == mode(1024, 4096) == "dense"
    assert mode(4096, 3199) == mode(4096, 2048) == mode(4096, 512) == "expert"
    assert mode(4096, 4096, torch.float16) == mode(4096, 4096, None) == "expert"
    assert mode(64, 4096) == "token" and mode(4096, 4096, H=16) == "token"
    assert kern.choose_mode(4096, 1024, E, 4096, 2) == "expert"      # dtype unknown
    cfg = kern.default_config(4096, 1024, E, 4096, 2, dtype=torch.bfloat16)
    assert cfg.schedule == "dense" and cfg.dense_chunk == 0
    assert dense_mod.dense_chunk(4096, E) == 13056 and dense_mod.dense_chunk(8, 70) == 70
    assert dense_mod.dense_chunk(4096, E, 100) == 100 and dense_mod.dense_chunk(2**20, E) == 64
    with pytest.raises(ValueError, match="dense_chunk"):
        kern.expert_forward(*make_inputs(3, 8, 5, 2, torch.bfloat16, "cpu")[:5], "silu",
                            config=replace(cfg, dense_chunk=-1))


@pytest.mark.parametrize("chunk", [0, 16], ids=lambda c: f"chunk{c}")
def test_dense_bfloat16_precision(chunk, device, monkeypatch):
    """``precision="bfloat16"`` in the dense schedule: out, dh, du and dv within the
    float64 formula's bound plus 2^-8 of their magnitude (each coefficient rounded to
    bfloat16 once) and different from the exact precision's; the routing weights'
    gradient and the out / dh rows of tokens with a repeated expert (recomputed pair by
    pair from float32 coefficients) bitwise the exact precision's.  Three calls on fresh
    inputs."""
    force_expert_schedule(monkeypatch, "dense", dense_chunk=chunk, dense_weight_grads=True)
    for call in range(3):
        inputs = make_inputs(23, 40, 70, 9, torch.bfloat16, device, "random", seed=60 + call)
        idx = inputs[4]
        repeat = (idx[:, :, None] == idx[:, None, :]).sum((1, 2)) > idx.shape[1]
        assert repeat.any() and not repeat.all()
        exact = run_op(*inputs, ACTS[call])
        fast = run_op(*inputs, ACTS[call], fn=partial(omni_expert, precision="bfloat16"))
        want, mag, n_ops = expert_oracle(*inputs, ACTS[call])
        for i in (0, 1, 2, 3):
            extra = 2 * accumulation_bound(n_ops, mag[i]) + 2.0**-8 * mag[i]
            assert_close_ulps(fast[i], want[i], 0.5, torch.bfloat16, extra, NAMES[i])
            assert not torch.equal(fast[i], exact[i]), NAMES[i]
        for i in (0, 1):
            assert torch.equal(fast[i][repeat], exact[i][repeat]), NAMES[i]
        assert torch.equal(fast[4], exact[4])


@pytest.mark.parametrize("schedule", ["token", "expert", "rows"])
def test_bfloat16_precision_elsewhere_exact(schedule, path, monkeypatch):
    """Schedules that gain nothing from 16-bit coefficients (and the PyTorch path) give
    the exact precision's bits under ``precision="bfloat16"``."""
    force_expert_schedule(monkeypatch, schedule)
    inputs = make_inputs(19, 40, 70, 9, torch.bfloat16, path, "random", seed=71)
    exact = run_op(*inputs, "silu")
    fast = run_op(*inputs, "silu", fn=partial(omni_expert, precision="bfloat16"))
    for name, x, y in zip(NAMES, exact, fast):
        assert torch.equal(x, y), name


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="large sizes need CUDA")
@pytest.mark.parametrize("gemm_grads", [False, True], ids=("pair-grads", "gemm-grads"))
@pytest.mark.parametrize("case", [(300, 256, 50000, 800, 0), (512, 256, 4096, 300, 1000)],
                         ids=lambda c: "T{}_H{}_E{}_k{}_chunk{}".format(*c))
def test_dense_large_gpu(case, gemm_grads, monkeypatch):
    """The dense schedule through cuBLAS (one chunk; five, the last short), its weight
    gradients by sorted pairs or as GEMMs, against float64, three calls on fresh inputs."""
    T, H, E, k, chunk = case
    force_expert_schedule(monkeypatch, "dense", dense_chunk=chunk, dense_weight_grads=gemm_grads)
    for call in range(3):
        inputs = make_inputs(T, H, E, k, torch.bfloat16, "cuda", "distinct", seed=call)
        check_against_float64(*inputs, ACTS[call], run_op(*inputs, ACTS[call]))


# --------------------------------------------------------------------------- GPU, larger

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="large sizes need CUDA")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [(512, 256, 4096, 16, "random"), (1024, 512, 65536, 32, "distinct"),
                                  (1000, 200, 300, 8, "skewed"), (300, 256, 50000, 1600, "distinct")],
                         ids=lambda c: "T{}_H{}_E{}_k{}_{}".format(*c))
def test_large_gpu(case, dtype):
    """The launch rule's own schedules (the last case: "dense" in bfloat16)."""
    T, H, E, k, kind = case
    for call in range(3):
        inputs = make_inputs(T, H, E, k, dtype, "cuda", kind, seed=call)
        got = run_op(*inputs, ACTS[call])
        check_against_float64(*inputs, ACTS[call], got)


def test_explicit_config_and_checks(device):
    """A config passed to the launchers is used as given (every schedule gives the same
    results) and a malformed one is rejected."""
    h, up, down, w, idx, go = make_inputs(9, 40, 12, 3, torch.float32, device, seed=8)
    rule = kern.default_config(9, 40, 12, 3, 4)
    outs = []
    for schedule in kern.SCHEDULES:
        cfg = replace(rule, schedule=schedule, gather=kern.Tile(2, 16, 1, 1))
        out, a, se, perm = kern.expert_forward(h, up, down, w, idx, "gelu", config=cfg)
        assert (perm.numel() > 0) == (schedule != "token")
        grads = kern.expert_backward(go, h, up, down, w, idx, a, se, perm, "gelu", config=cfg)
        outs.append((out, *grads))
    for got in outs[1:]:
        for x, y in zip(outs[0], got):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="ExpertConfig"):
        kern.expert_forward(h, up, down, w, idx, "gelu", config={"schedule": "token"})
    with pytest.raises(ValueError, match="schedule"):
        kern.expert_forward(h, up, down, w, idx, "gelu", config=replace(rule, schedule="auto"))
    with pytest.raises(ValueError, match="token.cols"):
        kern.expert_forward(h, up, down, w, idx, "gelu", config=replace(rule, token=kern.Tile(1, 8)))
    with pytest.raises(ValueError, match="rows.block_j"):
        kern.expert_forward(h, up, down, w, idx, "gelu",
                            config=replace(rule, rows=kern.RowTile(block_j=8)))
    with pytest.raises(TypeError, match="config.rows"):
        kern.expert_forward(h, up, down, w, idx, "gelu", config=replace(rule, rows=kern.Tile(1, 16)))
