"""The OmniMoE layer against its float64 token-centric reference.

Kernels (router, experts, fused activation) run on CUDA when present, else on CPU through
Triton's interpreter; the PyTorch path (CPU, interpreter off) is checked as well.
Each training test takes three optimizer steps and, before each, copies the layer's
current parameters and BatchNorm statistics into a float64 ``OmniMoEReference``: the
forward and every gradient must match on every call, not only the first.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch

from conftest import HAS_CUDA
from omni_moe import OmniMoE, OmniMoEConfig, UnroutedExpertsWarning
from omni_moe.layers.reference import OmniMoEReference
from router_checks import force_expert_schedule

pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
              pytest.mark.usefixtures("no_tf32")]

PARAMS = (
    "router_gate_x.weight", "router_gate_y.weight",
    "up_embed.weight", "down_embed.weight",
    "gate_proj.weight", "up_proj.weight", "down_proj.weight",
)
# The public reference module's state_dict (flash-algo/omni-moe OmniMoE).
UPSTREAM_KEYS = [
    "gate_proj.weight", "up_proj.weight", "down_proj.weight",
    "router_gate_x.weight", "router_gate_y.weight",
    "router_norm_x.running_mean", "router_norm_x.running_var", "router_norm_x.num_batches_tracked",
    "router_norm_y.running_mean", "router_norm_y.running_var", "router_norm_y.num_batches_tracked",
    "up_embed.weight", "down_embed.weight",
]


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    n = b.norm()
    d = (a - b).norm()
    return float(d / n) if n > 0 else float(d)


def cfg(H=32, I=48, E=64, k=4, act="silu", norm="batchnorm"):
    return OmniMoEConfig(hidden_size=H, intermediate_size=I, hidden_act=act,
                         num_experts=E, num_experts_per_token=k, router_norm=norm)


def train_and_compare(config, shape, device, dtype, steps=3, seed=0, make_optimizer=None,
                      amp=None, prepare=None):
    """Three Adam steps; per step returns {name: (err_ours, err_naive_or_None)} vs float64.

    ``prepare(layer)``: applied to the new layer before the optimizer sees it (e.g. a
    dtype change of some parameters).

    ``amp`` (bf16 or fp16): float32 parameters and inputs, the forward under
    ``torch.autocast(device, amp)`` -- the mixed-precision recipe; ``dtype`` must be
    float32.  The naive baseline is then the float32 PyTorch formula under the same
    autocast, and the router bounds add the rounding of h and W to ``amp`` before the
    router GEMM.

    float32: the float64 oracle routes by itself too, and the experts it picks must score
    the same as ours up to float32 rounding (an exact router may differ only among sums
    that tie within rounding); the gradients are then compared on our routing.

    Both dtypes: the chosen experts must be the float64 top-k of the layer's own
    log-probabilities (``check_routing``).

    bf16: rounding the router's inputs to bf16 legitimately changes which experts win a
    near-tie, and one flipped expert changes a token's output by O(1) -- a comparison on
    different routings would measure the flips, not the arithmetic.  So the float64 oracle
    and the naive bf16 PyTorch formula are both run on OUR indices, and our error must be
    no worse than the naive one's (both measured against float64); the scores and the
    running statistics are held to per-element bounds derived from the bf16 rounding of
    the router logits (``bf16_router_bounds``).
    """
    assert amp is None or dtype == torch.float32
    torch.manual_seed(seed)
    layer = OmniMoE(config).to(device)
    if dtype != torch.float32:
        layer = layer.to(dtype)
    if prepare is not None:
        prepare(layer)
    opt = (make_optimizer or (lambda m: torch.optim.Adam(m.parameters(), lr=3e-3)))(layer)
    gen = torch.Generator().manual_seed(seed + 1)
    low = amp or dtype  # the dtype the layer computes in
    dev_type = torch.device(device).type
    autocast = (lambda: torch.autocast(dev_type, dtype=amp)) if amp else contextlib.nullcontext
    results = []
    for step in range(steps):
        x = torch.randn(shape, generator=gen).to(dtype).to(device).requires_grad_()
        gout = torch.randn(shape, generator=gen).to(low).to(device)
        oracle = OmniMoEReference.from_module(layer, torch.float64)
        free = OmniMoEReference.from_module(layer, torch.float64)
        naive = OmniMoEReference.from_module(layer, dtype) if low != torch.float32 else None

        twin = copy.deepcopy(layer)  # the router's inputs, before this step's statistics update
        with autocast():
            out, (scores, idx) = layer(x, return_routing=True)
        assert out.shape == shape and out.dtype == low
        assert idx.shape == (*shape[:-1], config.num_experts_per_token) and idx.dtype == torch.int32
        out.backward(gout)
        assert x.grad.dtype == dtype

        xd = x.detach().double().requires_grad_()
        ref, (ref_scores, _) = oracle(xd, indices=idx, return_routing=True)
        ref.backward(gout.double())
        res = {}
        with torch.no_grad(), autocast():
            px, py = twin.router_log_probs(x.detach().reshape(-1, shape[-1]).to(low))
        check_routing(px, py, idx.reshape(-1, idx.shape[-1]), config.num_experts_per_token)
        if low == torch.float32:
            # Our scores are float32 log-probabilities at our indices.
            res["scores"] = (rel(scores, ref_scores), None)
        else:
            bounds = bf16_router_bounds(oracle, xd.detach(), idx, config, amp=amp)
            assert_within(scores, ref_scores, bounds["scores"], f"step {step} scores")
        if low == torch.float32:
            with torch.no_grad():
                _, (free_scores, _) = free(xd.detach(), return_routing=True)
            ours_sorted = ref_scores.sort(dim=-1, descending=True).values
            gap = (ours_sorted - free_scores).abs().max().item() if free_scores.numel() else 0.0
            assert gap <= 1e-5 * max(1.0, free_scores.abs().max().item() if free_scores.numel() else 1.0), \
                f"step {step}: our experts score {gap} below the float64 top-k"
        if naive is not None:
            xn = x.detach().clone().requires_grad_()
            with autocast():
                nout = naive(xn, indices=idx)
            nout.backward(gout.to(nout.dtype))
            nparams = dict(naive.named_parameters())
        res["out"] = (rel(out, ref), rel(nout, ref) if naive is not None else None)
        res["d_input"] = (rel(x.grad, xd.grad), rel(xn.grad, xd.grad) if naive is not None else None)
        oparams = dict(oracle.named_parameters())
        for name, p in layer.named_parameters():
            assert name in PARAMS
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            assert g.dtype == p.dtype, f"{name}: gradient {g.dtype} for a {p.dtype} parameter"
            g = g.to_dense() if g.is_sparse else g
            res["d_" + name] = (
                rel(g, oparams[name].grad),
                rel(nparams[name].grad, oparams[name].grad) if naive is not None else None,
            )
        if config.router_norm == "batchnorm":
            for ax in ("x", "y"):
                ours_n = getattr(layer, "router_norm_" + ax)
                ref_n = getattr(oracle, "router_norm_" + ax)
                assert ours_n.running_mean.dtype == torch.float32
                if low == torch.float32:
                    res[f"running_mean_{ax}"] = (rel(ours_n.running_mean, ref_n.running_mean), None)
                    res[f"running_var_{ax}"] = (rel(ours_n.running_var, ref_n.running_var), None)
                else:
                    assert_within(ours_n.running_mean, ref_n.running_mean, bounds["mean_" + ax],
                                  f"step {step} running_mean_{ax}")
                    assert_within(ours_n.running_var, ref_n.running_var, bounds["var_" + ax],
                                  f"step {step} running_var_{ax}")
                assert int(ours_n.num_batches_tracked) == step + 1
        results.append(res)
        opt.step()
        opt.zero_grad()
    return results


def check_routing(px, py, idx, k):
    """Each chosen expert is in the float64 top-k of the layer's own log-probabilities,
    up to the router's float32 sums: a pair chosen over the k-th best differs from it
    by at most the two sums' roundings, 2^-24 (|chosen| + |k-th|)."""
    pxd, pyd = px.detach().double().cpu(), py.detach().double().cpu()
    T, N = pxd.shape
    if T == 0:
        return
    s = (pxd[:, :, None] + pyd[:, None, :]).reshape(T, N * N)
    kth = s.topk(k, dim=1).values[:, -1:]
    idx = idx.detach().cpu().long()
    assert bool((idx >= 0).all() and (idx < N * N).all()), "routing index out of range"
    srt = idx.sort(dim=1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all()), "an expert chosen twice"
    chosen = s.gather(1, idx)
    eps = 2.0**-24 * (chosen.abs() + kth.abs())
    short = (kth - eps) - chosen
    if bool((short > 0).any()):
        t, r = (int(v) for v in torch.nonzero(short == short.max())[0])
        raise AssertionError(f"token {t}: expert {int(idx[t, r])} scores {chosen[t, r].item():.9g}, "
                             f"below the float64 k-th best {kth[t, 0].item():.9g} by more than rounding")


def bf16_router_bounds(oracle, xd, idx, config, amp=None):
    """Per-element error bounds of the bf16 layer's router outputs against the float64
    oracle, from the arithmetic: the router GEMM rounds each logit l once to bf16
    (<= 2^-9 |l|) after a float32 sum of H products (<= H 2^-24 sum|W h|); the rest is
    float32.  A logit error d (per column, its batch maximum D) moves the batch mean by
    <= D and the std by <= D, so xhat = (l - mean) / std moves by <= (d + D (1 + |xhat|))
    / std; log_softmax adds the largest such move of its row; a score adds both axes'.

    Under autocast (``amp``) h and W are float32 and rounded to ``amp`` before the GEMM
    (each product then off by <= 2 u |W h|, u = the unit roundoff: 2^-8 for bf16, 2^-11
    for fp16), and the logit is rounded to ``amp`` (<= u |l|)."""
    H = xd.shape[-1]
    h = xd.reshape(-1, H)
    N = config.num_expert_sqrt
    u = {None: 2.0**-9, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[amp]
    u_in = 0.0 if amp is None else u
    out = {}
    moves = []
    for ax in ("x", "y"):
        W = getattr(oracle, "router_gate_" + ax).weight.detach()
        l = h @ W.t()
        d = u * l.abs() + (2 * u_in + (H + 2) * 2.0**-24) * (h.abs() @ W.abs().t())
        if config.router_norm == "batchnorm":
            norm = getattr(oracle, "router_norm_" + ax)
            D = d.max(dim=0).values
            mean, var = l.mean(0), l.var(0, unbiased=False)
            std = torch.sqrt(var + norm.eps)
            xhat = (l - mean) / std
            mx = (d + D * (1 + xhat.abs())) / std
            m, T = norm.momentum, l.shape[0]
            rm, rv = norm.running_mean.detach(), norm.running_var.detach()
            out["mean_" + ax] = m * D + 2.0**-21 * (rm.abs() + mean.abs() + 1e-30)
            dvar = (2 * torch.sqrt(var) * D + D * D) * T / max(T - 1, 1)
            out["var_" + ax] = m * dvar + 2.0**-21 * (rv.abs() + var.abs() * T / max(T - 1, 1))
        else:
            mx = d
        moves.append(mx + mx.max(dim=1, keepdim=True).values + 2.0**-21 * (1 + l.abs()))
    flat = idx.reshape(-1, idx.shape[-1]).long().cpu()
    bx = moves[0].cpu().gather(1, flat // N)
    by = moves[1].cpu().gather(1, flat % N)
    out["scores"] = (bx + by).reshape(idx.shape)
    return out


def assert_within(got, want, bound, name):
    err = (got.detach().double().cpu() - want.detach().double().cpu()).abs()
    bound = bound.detach().double().cpu()
    assert not torch.isnan(err).any(), f"{name}: NaN"
    if bool((err > bound).any()):
        i = tuple(torch.nonzero(err / bound == (err / bound).max())[0].tolist())
        raise AssertionError(f"{name}: element {i} off by {err[i].item():.3g} > bound {bound[i].item():.3g}")


def assert_float32(results, tol=1e-5):
    for step, res in enumerate(results):
        for name, (e, _) in res.items():
            assert e <= tol, f"step {step} {name}: rel L2 {e:.3g} > {tol}"


def assert_no_worse_than_naive(results):
    for step, res in enumerate(results):
        for name, (e, e_naive) in res.items():
            assert e_naive is not None, name  # scores and statistics: per-element bounds above
            # Both share the bf16 roundings of the GEMM outputs; ours rounds once per op
            # where naive rounds per PyTorch op, so ours is normally better.  5% slack
            # absorbs the shared GEMM rounding noise.
            assert e <= 1.05 * e_naive + 1e-4, f"step {step} {name}: ours {e:.3g} vs naive bf16 {e_naive:.3g}"


CASES = [
    # (config, input shape) -- small, odd and non-power-of-two sizes for the interpreter
    (dict(H=32, I=48, E=64, k=4, act="silu", norm="batchnorm"), (2, 24, 32)),
    (dict(H=24, I=40, E=36, k=5, act="gelu", norm="none"), (40, 24)),
    (dict(H=16, I=24, E=49, k=3, act="relu", norm="batchnorm"), (2, 3, 5, 16)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_float32_three_steps(device, case):
    c, shape = CASES[case]
    assert_float32(train_and_compare(cfg(**c), shape, device, torch.float32))


def test_float32_expert_schedule(device, monkeypatch):
    """The layer with the experts' "expert" schedule forced (sorted dot products; the
    shapes above all pick the "token" one)."""
    force_expert_schedule(monkeypatch, "expert")
    c, shape = CASES[0]
    assert_float32(train_and_compare(cfg(**c), shape, device, torch.float32))


def test_bf16_no_worse_than_naive(device):
    # 256 tokens: enough that each rel. L2 error averages many roundings (with a few
    # dozen tokens, ours-vs-naive on the GEMM-dominated MLP gradients is a coin flip).
    c, _ = CASES[0]
    assert_no_worse_than_naive(train_and_compare(cfg(**c), (4, 64, 32), device, torch.bfloat16))


def test_torch_path(monkeypatch):
    """CPU without the interpreter: the PyTorch paths of all three ops."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    c, shape = CASES[0]
    assert_float32(train_and_compare(cfg(**c), shape, "cpu", torch.float32))
    c, shape = CASES[1]
    assert_float32(train_and_compare(cfg(**c), shape, "cpu", torch.float32, steps=1))


@pytest.mark.skipif(not HAS_CUDA, reason="larger sizes on GPU only")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("norm", ("batchnorm", "none"))
@pytest.mark.parametrize("E", (4096, 65536))
def test_gpu_large(dtype, norm, E):
    config = cfg(H=256, I=512, E=E, k=16, norm=norm)
    results = train_and_compare(config, (4, 512, 256), "cuda", dtype)
    if dtype == torch.float32:
        assert_float32(results)
    else:
        assert_no_worse_than_naive(results)


def test_eval_mode_uses_running_stats(device):
    torch.manual_seed(3)
    layer = OmniMoE(cfg()).to(device)
    for _ in range(2):  # move the running statistics off their initial values
        layer(torch.randn(40, 32, device=device))
    layer.eval()
    oracle = OmniMoEReference.from_module(layer, torch.float64)
    x = torch.randn(3, 7, 32, device=device)
    out, (_, idx) = layer(x, return_routing=True)
    ref = oracle(x.double(), indices=idx)
    assert rel(out, ref) <= 1e-5
    # a single token is fine in eval mode; (H,) in, (H,) out
    one = layer(x[0, 0])
    assert one.shape == (32,)
    assert rel(one, oracle(x[0, 0].double().unsqueeze(0), indices=idx[0, 0].unsqueeze(0))[0]) <= 1e-5


def test_eval_backward_after_a_training_call(path):
    """An eval-mode forward with grad, then a training-mode forward (which updates the
    running statistics in place), then the first forward's backward: every gradient is
    the one of the statistics that forward used -- bitwise what an immediate backward on
    a copy of the layer gives (fused prologue on the kernel path, BatchNorm modules on
    the PyTorch path)."""
    torch.manual_seed(4)
    layer = OmniMoE(cfg(H=16, I=24, E=64, k=3)).to(path)
    with torch.no_grad():   # far from a batch variance of ~|W h|^2: the update moves them
        layer.router_norm_x.running_var.fill_(0.05)
        layer.router_norm_y.running_var.fill_(5.0)
    layer.eval()
    twin = copy.deepcopy(layer)
    x = torch.randn(12, 16, device=path)
    gout = torch.randn(12, 16, device=path)
    xt = x.clone().requires_grad_()
    twin(xt).backward(gout)
    xl = x.clone().requires_grad_()
    out = layer(xl)
    layer.train()
    before = layer.router_norm_x.running_var.clone()
    layer(3.0 * torch.randn(12, 16, device=path))
    assert not torch.equal(layer.router_norm_x.running_var, before)
    out.backward(gout)
    assert torch.equal(xl.grad, xt.grad)
    for name in PARAMS:
        got, want = layer.get_parameter(name).grad, twin.get_parameter(name).grad
        assert torch.equal(got, want), name


@pytest.mark.parametrize("shape", [(0, 32), (3, 0, 32)])
def test_empty_batch(device, shape):
    layer = OmniMoE(cfg()).to(device)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(shape, device=device, requires_grad=True)
    out, (scores, idx) = layer(x, return_routing=True)
    assert out.shape == shape and idx.shape == (*shape[:-1], 4)
    out.sum().backward()
    assert x.grad.shape == shape
    for p in layer.parameters():
        assert p.grad is None or not bool(p.grad.any())
    after = layer.state_dict()
    for k, v in before.items():  # an empty batch leaves the running statistics alone
        assert torch.equal(v, after[k]), k


def test_state_dict_matches_public_reference():
    layer = OmniMoE(cfg())
    assert list(layer.state_dict().keys()) == UPSTREAM_KEYS
    # A state_dict with those names (the float64 twin writes the same) loads strictly,
    # in both directions, including the BatchNorm buffers.
    other = OmniMoEReference(cfg())
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
        other.router_norm_x.running_mean.fill_(0.5)
    layer.load_state_dict(other.state_dict(), strict=True)
    assert torch.equal(layer.up_embed.weight, other.up_embed.weight)
    assert torch.equal(layer.router_norm_x.running_mean, other.router_norm_x.running_mean)
    OmniMoEReference(cfg()).load_state_dict(layer.state_dict(), strict=True)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes["router_gate_x.weight"] == (8, 32) and shapes["up_embed.weight"] == (64, 32)
    assert shapes["gate_proj.weight"] == (48, 32) and shapes["down_proj.weight"] == (32, 48)
    # Router norm statistics are buffers (no optimizer sees them) and stay float32.
    names = {n for n, _ in layer.named_parameters()}
    assert names == set(PARAMS)
    layer = layer.to(torch.bfloat16)
    assert layer.router_norm_x.running_var.dtype == torch.float32
    assert layer.up_embed.weight.dtype == torch.bfloat16
    # router_norm="none" has no norm modules and no norm keys
    none = OmniMoE(cfg(norm="none"))
    assert [k for k in none.state_dict() if "norm" in k] == []


def test_config_positional_like_upstream():
    c = OmniMoEConfig(64, 128, "silu", 256, 8)
    assert (c.hidden_size, c.intermediate_size, c.hidden_act, c.num_experts,
            c.num_experts_per_token, c.router_norm) == (64, 128, "silu", 256, 8, "batchnorm")
    assert c.num_expert_sqrt == 16


GOOD = dict(hidden_size=32, intermediate_size=48, hidden_act="silu", num_experts=64,
            num_experts_per_token=4, router_norm="batchnorm")


@pytest.mark.parametrize("field,value,exc", [
    ("hidden_size", 0, ValueError), ("hidden_size", 32.0, TypeError), ("hidden_size", True, TypeError),
    ("intermediate_size", -1, ValueError), ("intermediate_size", "48", TypeError),
    ("hidden_act", "tanh", ValueError), ("hidden_act", None, TypeError),
    ("num_experts", 0, ValueError), ("num_experts", 64.0, TypeError),
    ("num_experts", None, TypeError), ("num_experts", 46341**2, ValueError),
    ("num_experts_per_token", 0, ValueError), ("num_experts_per_token", 65, ValueError),
    ("num_experts_per_token", None, TypeError), ("num_experts_per_token", 2.5, TypeError),
    ("router_norm", "rmsnorm", ValueError), ("router_norm", 1, TypeError),
    ("expert_precision", "float16", ValueError), ("expert_precision", None, TypeError),
])
def test_config_validation(field, value, exc):
    kwargs = dict(GOOD, **{field: value})
    with pytest.raises(exc, match=field):
        OmniMoEConfig(**kwargs)


@pytest.mark.parametrize("fused", [True, False], ids=("fused", "unfused"))
def test_expert_precision(fused, device, monkeypatch):
    """``expert_precision="bfloat16"`` reaches the expert op on the layer's fused output
    stage and on the unfused path (a hook on the MLP): with the dense schedule forced,
    the output, the input gradient and both table gradients move (rounded coefficients),
    within a few bfloat16 roundings of the exact precision's."""
    force_expert_schedule(monkeypatch, "dense", dense_weight_grads=True)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 13, 32, generator=gen).to(device, torch.bfloat16)
    go = torch.randn(2, 13, 32, generator=gen).to(device, torch.bfloat16)
    got = {}
    for precision in ("exact", "bfloat16"):
        torch.manual_seed(0)
        c = OmniMoEConfig(32, 48, num_experts=64, num_experts_per_token=8, router_norm="layernorm",
                          expert_precision=precision)
        layer = OmniMoE(c).to(device, torch.bfloat16)
        if not fused:
            layer.gate_proj.register_forward_hook(lambda mod, args, out: None)
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(go)
        got[precision] = (out, xi.grad, layer.up_embed.weight.grad, layer.down_embed.weight.grad)
    for x, y in zip(got["exact"], got["bfloat16"]):
        assert not torch.equal(x, y)
        assert ((x.float() - y.float()).norm() / x.float().norm()) < 0.02


def test_config_non_square_count_warns():
    """A count that is not a perfect square (checkpoints of the public upstream module hold
    such tables) builds the grid of N = isqrt(E), with one warning, at the caller's line,
    naming the rows no token reaches; k is bounded by the N*N routed experts."""
    with pytest.warns(UnroutedExpertsWarning) as rec:
        c = OmniMoEConfig(32, 48, num_experts=1000, num_experts_per_token=4)
    assert len(rec) == 1 and rec[0].filename == __file__
    assert str(rec[0].message).startswith(
        "num_experts=1000 is not a perfect square: the router's N x N grid (N = 31) addresses "
        "experts 0..960; the expert tables keep 1000 rows and rows 961..999 are never routed")
    assert (c.num_experts, c.num_expert_sqrt, c.num_experts_per_token) == (1000, 31, 4)
    with pytest.warns(UnroutedExpertsWarning, match="row 9 is never routed"):
        assert OmniMoEConfig(32, 48, num_experts=10, num_experts_per_token=9).num_expert_sqrt == 3
    for name in ("num_experts_per_token", "num_experts_per_tok"):
        with pytest.warns(UnroutedExpertsWarning), \
                pytest.raises(ValueError, match=rf"^{name} must be in \[1, 9\], got 10$"):
            OmniMoEConfig(32, 48, num_experts=10, **{name: 10})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OmniMoEConfig(32, 48, num_experts=9, num_experts_per_token=9)   # a square: silent


def test_module_argument_errors():
    with pytest.raises(TypeError, match="config"):
        OmniMoE(dict(GOOD))
    layer = OmniMoE(OmniMoEConfig(**GOOD))
    with pytest.raises(ValueError, match="hidden_states"):
        layer(torch.randn(4, 31))
    with pytest.raises(TypeError, match="hidden_states"):
        layer([1.0] * 32)


@pytest.mark.parametrize("backend", ("eager", "aot_eager"))
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) of the whole layer (training mode, BatchNorm
    buffers updated in the graph) gives the eager layer's output and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(5)
    layer = OmniMoE(cfg())
    twin = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x = torch.randn(2, 12, 32)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    out = compiled(xa)
    ref = twin(xb)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(layer.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(layer.router_norm_x.running_mean, twin.router_norm_x.running_mean)


def test_pickle_without_distributed_attributes_loads():
    """A whole-module pickle whose layer lacks the attributes ``omni_moe.distributed``
    sets (``router_stats_group``, ``expert_sharding``) loads with their defaults, None,
    and computes what the layer does."""
    import pickle

    torch.manual_seed(2)
    layer = OmniMoE(cfg(H=8, I=12, E=9, k=2)).eval()
    x = torch.randn(5, 8)
    want = layer(x)
    del layer.__dict__["router_stats_group"], layer.__dict__["expert_sharding"]
    back = pickle.loads(pickle.dumps(layer))
    assert "router_stats_group" not in layer.__dict__      # the pickle really lacks them
    assert back.__dict__.get("router_stats_group", "missing") is None
    assert back.__dict__.get("expert_sharding", "missing") is None
    assert torch.equal(back(x), want)


def test_fused_router_matches_plain_path(device):
    """The layer's fused router prologue (one GEMM + router_norm kernels) against its
    plain PyTorch path (two Linear, RouterNorm, log_softmax) on the same module: the
    log-probabilities, the input/gate gradients and the running statistics agree, in
    training and in eval mode; a forward hook on a router module selects the plain path."""
    torch.manual_seed(11)
    layer = OmniMoE(cfg(H=24, E=49, k=3)).to(device)
    twin = copy.deepcopy(layer)
    twin._fused_router_mode = lambda h: None            # always the plain path
    for training in (True, False):
        layer.train(training)
        twin.train(training)
        x = torch.randn(21, 24, device=device)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        assert layer._fused_router_mode(xa) == ("batch" if training else "running")
        pa, pb = layer.router_log_probs(xa), twin.router_log_probs(xb)
        gp = [torch.randn_like(t) for t in pa]
        torch.autograd.backward(pa, gp)
        torch.autograd.backward(pb, gp)
        for u, v in zip(pa, pb):
            assert rel(u, v) <= 1e-6
        assert rel(xa.grad, xb.grad) <= 1e-5
        for name in ("router_gate_x", "router_gate_y"):
            assert rel(getattr(layer, name).weight.grad, getattr(twin, name).weight.grad) <= 1e-5
        for ax in ("x", "y"):
            na, nb = getattr(layer, "router_norm_" + ax), getattr(twin, "router_norm_" + ax)
            assert rel(na.running_mean, nb.running_mean) <= 1e-6
            assert rel(na.running_var, nb.running_var) <= 1e-6
            assert int(na.num_batches_tracked) == int(nb.num_batches_tracked)
    handle = layer.router_norm_y.register_forward_hook(lambda m, i, o: None)
    assert layer._fused_router_mode(x) is None
    handle.remove()
