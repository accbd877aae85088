"""omni_moe.hf.losses against direct float64 formulas written here (loops over tokens and
axes, numpy): the load-balancing loss, the router z-loss and its gradient, padding masks,
several layers, argument errors.  CPU, no model."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from omni_moe.hf import expert_usage, router_aux_loss, router_z_loss  # noqa: E402


def _layers(shapes, seed=0, scale=2.0):
    """(T, 2N) float32 log-probabilities per layer: log_softmax of random logits per axis."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for T, n in shapes:
        lg = torch.randn(T, 2, n, generator=g) * scale
        out.append(torch.log_softmax(lg, -1).reshape(T, 2 * n))
    return out


def _weights(mask, T):
    return np.ones(T) if mask is None else mask.reshape(-1).double().numpy()


def aux_direct(layers, k, mask=None):
    """router_aux_loss written out: per layer and axis, f (candidate shares) . P (mean
    probabilities) times N, averaged over the two axes, then over the layers."""
    per_layer = []
    for lp in layers:
        lp = lp.double().numpy()
        T, n = lp.shape[0], lp.shape[1] // 2
        w, kk = _weights(mask, T), min(k, n)
        axes = []
        for a in range(2):
            f, P = np.zeros(n), np.zeros(n)
            for t in range(T):
                row = lp[t, a * n:(a + 1) * n]
                for i in np.argsort(-row, kind="stable")[:kk]:
                    f[i] += w[t]
                P += w[t] * np.exp(row)
            f /= max(w.sum(), 1.0) * kk
            P /= max(w.sum(), 1.0)
            axes.append(n * float(f @ P))
        per_layer.append(sum(axes) / 2)
    return sum(per_layer) / len(per_layer)


def _lse(row):
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


def z_direct(layers, mask=None):
    """The z-loss written out: per layer, per axis, the (masked) token mean of
    logsumexp(l)^2; averaged over the two axes, then over the layers."""
    per_layer = []
    for lg in layers:
        lg = lg.double().numpy()
        T, n = lg.shape[0], lg.shape[1] // 2
        w = _weights(mask, T)
        axes = [sum(w[t] * _lse(lg[t, a * n:(a + 1) * n]) ** 2 for t in range(T)) / max(w.sum(), 1.0)
                for a in range(2)]
        per_layer.append(sum(axes) / 2)
    return sum(per_layer) / len(per_layer)


# ------------------------------------------------------------------ load balancing
@pytest.mark.parametrize("k", [1, 3, 7])
def test_aux_loss_is_the_mean_over_layers_of_the_direct_formula(k):
    """Three layers of different N and balance: the loss is the average of the per-layer
    values (a sum over layers would be about three times it)."""
    layers = _layers([(9, 5), (9, 6), (9, 4)], seed=k, scale=2.0)
    layers[1] = _layers([(9, 6)], seed=50, scale=0.1)[0]    # nearly uniform: about 1
    got = router_aux_loss(layers, k)
    assert got.dtype == torch.float32 and got.dim() == 0
    want = aux_direct(layers, k)
    assert abs(got.item() - want) <= 1e-5 * want
    per_layer = [aux_direct([lp], k) for lp in layers]
    assert min(per_layer) < want < max(per_layer)


def test_aux_loss_invariant_under_repeated_layers():
    (lp,) = _layers([(12, 5)], seed=2)
    one = router_aux_loss([lp], 2)
    torch.testing.assert_close(router_aux_loss([lp, lp, lp], 2), one, rtol=1e-6, atol=0)
    torch.testing.assert_close(router_aux_loss(lp, 2), one, rtol=0, atol=0)


def test_aux_loss_mask_and_empty():
    layers = _layers([(6, 5), (6, 5)], seed=3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    want = aux_direct(layers, 2, mask)
    assert abs(router_aux_loss(layers, 2, mask).item() - want) <= 1e-5 * want
    assert router_aux_loss([], 2).item() == 0.0


# ------------------------------------------------------------------ z-loss
def _normalised_logits(shapes, seed=0, scale=3.0, shift=1.5):
    """(T, 2N) pre-softmax logits, not normalised to a zero logsumexp."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(T, 2 * n, generator=g) * scale + shift) for T, n in shapes]


@pytest.mark.parametrize("with_mask", [False, True])
def test_z_loss_matches_direct_formula(with_mask):
    layers = _normalised_logits([(6, 5), (6, 7), (6, 3)], seed=1)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]) if with_mask else None
    got = router_z_loss(layers, mask)
    assert got.dtype == torch.float32 and got.dim() == 0
    want = z_direct(layers, mask)
    assert abs(got.item() - want) <= 1e-5 * want
    per_layer = [z_direct([lg], mask) for lg in layers]
    assert min(per_layer) < want < max(per_layer)      # a mean, not a sum
    # each axis counts: a shift of one axis's logits of one token changes the loss
    bumped = [lg.clone() for lg in layers]
    bumped[0][1, 5:] += 4.0
    assert router_z_loss(bumped, mask).item() > got.item() + 0.1


def test_z_loss_gradient_is_the_formula_derivative():
    """d z / d l[t, a, i] = 2 lse_a(t) softmax(l_a(t))_i w_t / (2 W L) for L layers."""
    layers = [lg.requires_grad_() for lg in _normalised_logits([(5, 4), (5, 6)], seed=4)]
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    router_z_loss(layers, mask).backward()
    W, L = 4.0, 2
    for lg in layers:
        T, n = lg.shape[0], lg.shape[1] // 2
        x = lg.detach().double().view(T, 2, n)
        lse = torch.logsumexp(x, -1, keepdim=True)
        want = 2 * lse * torch.softmax(x, -1) * mask.double().view(T, 1, 1) / (2 * W * L)
        torch.testing.assert_close(lg.grad.double().view(T, 2, n), want, rtol=1e-5, atol=1e-7)
        assert lg.grad[4].abs().max() == 0      # the padding token


def test_z_loss_of_log_probabilities_is_zero():
    """The log-probabilities' logsumexp is 0: fed them, the z-loss vanishes (which is why
    it reads the normalised logits)."""
    assert router_z_loss(_layers([(7, 5)], seed=5)).abs().item() < 1e-10


def test_z_loss_empty():
    assert router_z_loss([]).item() == 0.0
    assert router_z_loss(torch.zeros(0, 8)).item() == 0.0


# ------------------------------------------------------------------ argument errors
def test_loss_arguments_named():
    (lp,) = _layers([(4, 5)])
    with pytest.raises(TypeError, match="top_k must be an int, got float"):
        router_aux_loss([lp], 2.0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        router_aux_loss([lp], 0)
    with pytest.raises(ValueError, match=r"router_logits must hold \(T, 2N\) tensors"):
        router_z_loss([torch.zeros(3, 5)])
    with pytest.raises(TypeError, match="router_logits must hold tensors"):
        router_z_loss([[0.0, 1.0]])
    # the name the caller's argument has, not the router's internal one
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 25\]"):
        expert_usage([lp], 300)
    # numpy and torch integer scalars are counts too
    want = router_aux_loss([lp], 2)
    assert router_aux_loss([lp], np.int64(2)) == want == router_aux_loss([lp], torch.tensor(2))
    assert torch.equal(expert_usage([lp], np.int32(3)).counts[0], expert_usage([lp], 3).counts[0])
