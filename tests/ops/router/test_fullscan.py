"""The original (full-scan) router against brute force, forward and backward.

Kernel tests take the ``device`` fixture: CUDA when present, else CPU through Triton's
interpreter (TRITON_INTERPRET=1) at small sizes.  With CUDA the same tests also run at
the seed's sizes (T up to 4096, N up to 256, k 16/32).

The full scan ranks exactly like the brute-force oracle (same float32 sums, same total
order, ties to the lower flat index), so beyond the contract checks these tests also
assert that its indices equal brute force's bitwise.
"""

import zlib

import pytest
import torch

import omni_moe.ops.router.fullscan as fullscan
from conftest import HAS_CUDA, INTERPRET
from omni_moe.ops._dispatch import use_triton
from omni_moe.ops.router.fullscan import FullscanConfig, fullscan_router_forward
from omni_moe.ops.router.op import route
from router_checks import DTYPES, check_router_backward, check_router_output, make_logits, oracle_topk

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")



def triton_omni_router_func(x, y, n, k):
    return route(x, y, n, k, "fullscan")


def _split(chunk, merge_block=None):
    """The chunk + merge path with the given chunk (None: the default rule)."""
    if chunk is None:
        return None
    return FullscanConfig(split=True, chunk=chunk,
                          merge_block=merge_block or fullscan.MAX_KEYS_PER_PROGRAM)


KINDS = ("randn", "ties", "masked", "nan", "halves", "transposed")

# (T, N, k): N = 1, non-powers of two, k = 1, odd k, k = N^2, k > N; N >= 128 takes the
# chunk + merge kernels.
SMALL = [
    (7, 1, 1), (9, 3, 9), (16, 5, 25), (5, 5, 7), (33, 12, 17), (6, 33, 40),
    (12, 33, 1), (2, 128, 16), (3, 130, 9),
]
# The seed's cases and neighbours; GPU only (through the interpreter they take minutes).
LARGE = [
    (1024, 64, 16), (1024, 64, 32), (1024, 128, 16), (1024, 128, 32), (1024, 256, 16),
    (1024, 256, 32), (4096, 64, 16), (2048, 100, 31), (4096, 256, 32), (1000, 130, 129),
]
SIZES = SMALL + (LARGE if HAS_CUDA else [])


def _seed(*parts):
    # Stable across processes (str hashes are salted per process).
    return zlib.crc32(repr(parts).encode())


def _check(x, y, k, scores, indices):
    check_router_output(x, y, k, scores, indices)
    T, N = x.shape
    if T * N * N <= 2**22:
        # Same float32 sums and the same total order (ties to the lower flat index) as
        # the independent oracle: the indices agree exactly.
        _, flat = oracle_topk(x, y, k)
        assert torch.equal(indices.cpu().long(), flat), "full scan ranks unlike brute force"


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,N,k", SIZES)
def test_forward_matches_bruteforce(device, T, N, k, dtype, kind):
    x, y = make_logits(T, N, dtype, device, kind, seed=_seed(T, N, k, str(dtype), kind))
    scores, indices = triton_omni_router_func(x, y, N, k)
    _check(x, y, k, scores, indices)


def test_interpreter_runs_the_fullscan_kernel(device, monkeypatch):
    """The entry point really launches the full-scan kernels on this device."""
    from omni_moe.ops.router import op

    calls = []
    real = op._TRITON_FORWARD["fullscan"]

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setitem(op._TRITON_FORWARD, "fullscan", spy)
    x, y = make_logits(6, 5, torch.float32, device, "randn", seed=3)
    assert use_triton(x)
    scores, indices = triton_omni_router_func(x, y, 5, 4)
    assert calls == [(6, 5)]
    _check(x, y, 4, scores, indices)


# Force the chunk + merge path at small N, with chunks smaller than k and merges that
# stream because the candidates exceed the register block.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "T,N,k,chunk,merge_block",
    [(6, 5, 25, 4, 16), (6, 5, 25, 8, None), (3, 12, 20, 16, 32), (4, 7, 3, 16, 16),
     (9, 3, 1, 16, None), (3, 130, 5, 4096, 16)],
)
def test_split_and_streaming_merge_paths(device, T, N, k, chunk, merge_block, dtype):
    for kind in ("randn", "ties", "masked", "nan"):
        x, y = make_logits(T, N, dtype, device, kind, seed=_seed(T, N, k, chunk, kind))
        scores, indices = fullscan_router_forward(x, y, k, config=_split(chunk, merge_block))
        _check(x, y, k, scores, indices)


@pytest.mark.parametrize("split_chunk", [None, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_preallocated_outputs(device, dtype, split_chunk):
    """Every output element is written: NaN / -1 poison must not survive."""
    for T, N, k in ((9, 5, 25), (10, 12, 7), (3, 130, 9)):
        x, y = make_logits(T, N, dtype, device, "masked", seed=_seed(T, N, k))
        scores = torch.full((T, k), float("nan"), dtype=dtype, device=device)
        indices = torch.full((T, k), -1, dtype=torch.int32, device=device)
        chunk = split_chunk if N < 128 else None  # N >= 128 splits anyway
        s, i = fullscan_router_forward(x, y, k, scores, indices, config=_split(chunk))
        assert s is scores and i is indices
        _check(x, y, k, s, i)
        # Strided (transposed) output views are written through their strides.
        scores_t = torch.full((k, T), float("nan"), dtype=dtype, device=device).t()
        indices_t = torch.full((k, T), -1, dtype=torch.int32, device=device).t()
        fullscan_router_forward(x, y, k, scores_t, indices_t, config=_split(chunk))
        assert torch.equal(_bits(scores_t), _bits(scores)) and torch.equal(indices_t, indices)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,N,k", [(5, 5, 25), (6, 33, 17), (3, 130, 12)])
def test_special_rows(device, T, N, k, dtype):
    """All-NaN, all -inf, +inf (NaN where +inf meets -inf), -0.0 and constant rows."""
    nan, inf = float("nan"), float("inf")
    g = torch.Generator().manual_seed(_seed(T, N, k))
    x = torch.randn(T, N, generator=g)
    y = torch.randn(T, N, generator=g)
    x[0] = nan                      # every sum NaN
    y[1] = -inf                     # every sum -inf
    x[2, ::2] = inf                 # +inf meets y's -inf below: NaN among +inf
    y[2, 1::3] = -inf
    if T > 3:
        x[3] = -0.0
        y[3] = 0.0                  # k equal zeros: lowest flat indices win
        x[4] = 1.0
        y[4, : N // 2] = nan
    x, y = x.to(dtype).to(device), y.to(dtype).to(device)
    scores, indices = triton_omni_router_func(x, y, N, k)
    _check(x, y, k, scores, indices)
    assert bool(torch.isnan(scores[0].float()).all())
    assert indices[0].tolist() == list(range(k))
    assert bool((scores[1].float() == -inf).all())
    assert indices[1].tolist() == list(range(k))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_masked_and_all_nan_take_every_pair(device, dtype):
    """k = N^2 on rows with no finite pair still yields every flat index once."""
    N = 6
    x = torch.tensor([[float("-inf")] * N, [float("nan")] * N, [1.0] * N], dtype=dtype)
    y = torch.tensor([[float("-inf")] * N, [2.0] * N, [float("nan")] * N], dtype=dtype)
    x, y = x.to(device), y.to(device)
    for split_chunk in (None, 8):
        scores, indices = fullscan_router_forward(x, y, N * N, config=_split(split_chunk))
        _check(x, y, N * N, scores, indices)
        assert indices.tolist() == [list(range(N * N))] * 3


def _leaves(T, N, dtype, device, kind, seed):
    """Leaf tensors to differentiate and the (x, y) views the router sees."""
    if kind == "halves":
        z, _ = make_logits(T, N, dtype, device, "halves", seed=seed)
        z = z._base.detach().requires_grad_()
        return (z,), z[:, :N], z[:, N:], lambda: (z.grad[:, :N], z.grad[:, N:])
    x, y = make_logits(T, N, dtype, device, kind, seed=seed)
    x = x.detach().requires_grad_()
    y = y.detach().requires_grad_()
    return (x, y), x, y, lambda: (x.grad, y.grad)


BWD_SIZES = [(9, 3, 9), (16, 5, 25), (33, 12, 17), (6, 33, 40), (3, 130, 9)] + (
    [(1024, 64, 16), (1024, 256, 32), (4096, 128, 16)] if HAS_CUDA else []
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,N,k", BWD_SIZES)
def test_backward_three_consecutive_calls(device, T, N, k, dtype):
    """Fresh inputs and gradients on each of three calls, each checked exactly."""
    for call, kind in enumerate(("randn", "masked", "halves")):
        seed = _seed(T, N, k, str(dtype), call)
        leaves, x, y, grads = _leaves(T, N, dtype, device, kind, seed)
        scores, indices = triton_omni_router_func(x, y, N, k)
        _check(x.detach(), y.detach(), k, scores.detach(), indices)
        g = torch.randn(T, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)
        scores.backward(g)
        dx, dy = grads()
        check_router_backward(g, indices, N, dx, dy)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_deterministic(device, dtype):
    for T, N, k in ((17, 12, 9), (2, 130, 9)):
        x, y = make_logits(T, N, dtype, device, "ties", seed=_seed(T, N, k))
        g = torch.randn(T, k, generator=torch.Generator().manual_seed(T + k)).to(dtype).to(device)
        runs = []
        for _ in range(3):
            xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
            s, i = triton_omni_router_func(xl, yl, N, k)
            s.backward(g)
            runs.append((_bits(s.detach()), i, _bits(xl.grad), _bits(yl.grad)))
        for other in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_batch_and_k_zero(device, dtype):
    x = torch.empty(0, 5, dtype=dtype, device=device, requires_grad=True)
    y = torch.empty(0, 5, dtype=dtype, device=device, requires_grad=True)
    s, i = triton_omni_router_func(x, y, 5, 3)
    assert s.shape == (0, 3) and i.shape == (0, 3) and s.dtype == dtype and i.dtype == torch.int32
    s.sum().backward()
    assert x.grad.shape == (0, 5) and y.grad.shape == (0, 5)

    x, y = make_logits(4, 5, dtype, device, "randn", seed=1)
    x.requires_grad_()
    y.requires_grad_()
    s, i = triton_omni_router_func(x, y, 5, 0)
    assert s.shape == (4, 0) and i.shape == (4, 0) and i.dtype == torch.int32
    s.sum().backward()
    assert bool((x.grad == 0).all()) and bool((y.grad == 0).all())
    for split_chunk in (None, 8):
        for T, k in ((0, 4), (3, 0)):
            xs, ys = make_logits(T, 5, dtype, device, "randn", seed=2)
            s, i = fullscan_router_forward(xs, ys, k, config=_split(split_chunk))
            assert s.shape == (T, k) and i.shape == (T, k)


def _bad_cases():
    x = torch.randn(4, 5)
    y = torch.randn(4, 5)
    return [
        ((x[0], y, 5, 2), ValueError, "router_logits_x"),
        ((x, y[None], 5, 2), ValueError, "router_logits_y"),
        ((x, torch.randn(3, 5), 5, 2), ValueError, "router_logits_y"),
        ((x, torch.randn(4, 6), 5, 2), ValueError, "router_logits_y"),
        ((x, y.to("meta"), 5, 2), ValueError, "router_logits_y"),
        ((x, y.half(), 5, 2), TypeError, "router_logits_y"),
        ((x.double(), y.double(), 5, 2), TypeError, "router_logits_x"),
        ((x.long(), y.long(), 5, 2), TypeError, "router_logits_x"),
        ((x, y.int(), 5, 2), TypeError, "router_logits_y"),
        ((x.numpy(), y, 5, 2), TypeError, "router_logits_x"),
        ((x, y, 4, 2), ValueError, "num_expert_sqrt"),
        ((x, y, 0, 2), ValueError, "num_expert_sqrt"),
        ((x, y, 5.0, 2), TypeError, "num_expert_sqrt"),
        ((x, y, True, 2), TypeError, "num_expert_sqrt"),
        ((x, y, 5, -1), ValueError, "num_experts_per_token"),
        ((x, y, 5, 26), ValueError, "num_experts_per_token"),
        ((x, y, 5, 2.0), TypeError, "num_experts_per_token"),
        ((x, y, 5, True), TypeError, "num_experts_per_token"),
        ((x, y, 5, None), TypeError, "num_experts_per_token"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_name_the_argument(case):
    args, exc, name = _bad_cases()[case]
    with pytest.raises(exc, match=name):
        triton_omni_router_func(*args)


_COEF = torch.tensor([3.0, -1.0, 2.0, 0.5, 1.0, -2.0, 4.0])


def _model(x, y):
    s, i = triton_omni_router_func(x, y, 5, 7)
    # Exactly representable weights: the gradient reaching the router is exact under
    # every backend, so gradients compare bitwise.
    return (s.float() * _COEF).sum(), i


@pytest.mark.parametrize("path", ["interpreter", "torch"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_torch_compile_fullgraph_cpu(backend, path, monkeypatch):
    """fullgraph=True: the custom op traces without graph breaks, forward and backward,
    on CPU through the kernels (interpreter) and through the PyTorch path; inductor checks
    the real outputs' strides against the fake implementation's."""
    if path == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1")
    torch._dynamo.reset()
    compiled = torch.compile(_model, backend=backend, fullgraph=True)
    for seed in range(2):
        x, y = make_logits(6, 5, torch.float32, "cpu", ("randn", "masked")[seed], seed=seed)
        xe, ye = x.clone().requires_grad_(), y.clone().requires_grad_()
        xc, yc = x.clone().requires_grad_(), y.clone().requires_grad_()
        out_e, i_e = _model(xe, ye)
        out_c, i_c = compiled(xc, yc)
        assert torch.equal(i_e, i_c)
        assert torch.allclose(out_e, out_c, rtol=1e-6, atol=0, equal_nan=True)
        out_e.backward()
        out_c.backward()
        assert torch.equal(xe.grad, xc.grad) and torch.equal(ye.grad, yc.grad)


@pytest.mark.parametrize("algorithm", ["fullscan", "pruned"])
def test_eager_path_matches_custom_op(device, algorithm):
    """Eager calls skip the custom op (host time); both paths must give the same bits."""
    T, N, k = 37, 12, 9
    x0, y0 = make_logits(T, N, torch.bfloat16, device, "randn", seed=11)
    g = torch.randn(T, k, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16).to(device)
    xe, ye = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    se, ie = route(xe, ye, N, k, algorithm)
    se.backward(g)
    xo, yo = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    so, io = torch.ops.omni_moe.router_forward(xo, yo, k, algorithm)
    so.backward(g)
    assert torch.equal(se, so) and torch.equal(ie, io)
    assert torch.equal(xe.grad, xo.grad) and torch.equal(ye.grad, yo.grad)
    with torch.no_grad():
        sn, i_n = route(x0, y0, N, k, algorithm)
    assert torch.equal(sn, se) and torch.equal(i_n, ie)
    assert not ie.requires_grad
    check_router_output(x0, y0, k, se, ie)
