"""omni_moe.param_groups and omni_moe.optim.clip_grad_norm_ (CPU, PyTorch path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import omni_moe
from omni_moe import OmniMoE, OmniMoEConfig, param_groups
from omni_moe.optim import clip_grad_norm_, expert_parameters


def _cfg(sparse=False):
    return OmniMoEConfig(hidden_size=8, intermediate_size=12, num_experts=16,
                         num_experts_per_token=2, sparse_expert_grad=sparse)


class TwoLayers(nn.Module):
    def __init__(self, sparse=False):
        super().__init__()
        self.embed = nn.Embedding(10, 8)          # an ordinary embedding: not an expert table
        self.moe1 = OmniMoE(_cfg(sparse))
        self.moe2 = OmniMoE(_cfg(sparse))
        self.moe2.up_embed = self.moe1.up_embed   # tied table: listed once
        self.head = nn.Linear(8, 10)

    def forward(self, tok):
        return self.head(self.moe2(self.moe1(self.embed(tok))))


def test_exported():
    assert omni_moe.param_groups is param_groups and "param_groups" in omni_moe.__all__


def test_groups_partition_parameters():
    m = TwoLayers()
    m.head.bias.requires_grad_(False)
    default, experts = param_groups(m, lr=1e-3, expert_lr=1e-2, weight_decay=0.1)
    want = [m.moe1.up_embed.weight, m.moe1.down_embed.weight, m.moe2.down_embed.weight]
    assert [id(p) for p in experts["params"]] == [id(p) for p in want]
    assert expert_parameters(m) == want
    assert experts["lr"] == 1e-2 and experts["weight_decay"] == 0.0 and experts["name"] == "experts"
    assert default["lr"] == 1e-3 and default["weight_decay"] == 0.1 and default["name"] == "default"
    ids_default = {id(p) for p in default["params"]}
    ids_expert = {id(p) for p in experts["params"]}
    assert not ids_default & ids_expert
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert ids_default | ids_expert == trainable
    assert id(m.head.bias) not in ids_default and id(m.embed.weight) in ids_default
    assert len(default["params"]) == len(ids_default)
    # expert_lr defaults to lr; expert weight decay settable
    g = param_groups(m, lr=3e-4, expert_weight_decay=0.01)
    assert g[1]["lr"] == 3e-4 and g[1]["weight_decay"] == 0.01 and isinstance(g, list)
    # a model without OmniMoE layers: empty expert group
    assert param_groups(nn.Linear(3, 3), lr=1.0)[1]["params"] == []


def test_one_adamw_uses_the_groups():
    """AdamW with the groups: expert rows decay by expert_weight_decay (0), the rest by
    weight_decay; each at its own learning rate."""
    torch.manual_seed(0)
    m = TwoLayers()
    opt = torch.optim.AdamW(param_groups(m, lr=1e-3, expert_lr=5e-2, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    # Zero gradients: AdamW then changes a weight only through its decoupled decay.
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in m.named_parameters():
        if "embed" in n and "moe" in n:
            assert torch.equal(p, before[n]), n                     # no decay on expert tables
        else:
            assert torch.allclose(p, before[n] * (1 - 1e-3 * 0.5)), n
    # One step with real gradients: expert rows move by ~expert_lr (Adam's first step).
    opt = torch.optim.AdamW(param_groups(m, lr=1e-3, expert_lr=5e-2))
    m(torch.randint(0, 10, (12,))).sum().backward()
    w0 = m.moe1.down_embed.weight.detach().clone()
    opt.step()
    moved = (m.moe1.down_embed.weight - w0).abs()
    assert moved.max().item() == pytest.approx(5e-2, rel=1e-3)


def test_sparse_split_with_sparse_adam():
    torch.manual_seed(1)
    m = TwoLayers(sparse=True)
    default, experts = param_groups(m, lr=1e-3, expert_lr=1e-2, split=True)
    experts.pop("weight_decay")
    opts = [torch.optim.Adam([default]), torch.optim.SparseAdam([experts])]
    for _ in range(2):
        for o in opts:
            o.zero_grad()
        m(torch.randint(0, 10, (12,))).sum().backward()
        assert m.moe1.up_embed.weight.grad.is_sparse
        for o in opts:
            o.step()


@pytest.mark.parametrize("kw,exc", [
    (dict(lr="1"), TypeError), (dict(lr=-1.0), ValueError), (dict(lr=float("nan")), ValueError),
    (dict(lr=1.0, expert_lr=True), TypeError), (dict(lr=1.0, weight_decay=-0.1), ValueError),
    (dict(lr=1.0, expert_weight_decay=None), TypeError),
])
def test_bad_arguments(kw, exc):
    name = [k for k in kw if k != "lr"][-1] if len(kw) > 1 else "lr"
    with pytest.raises(exc, match=name):
        param_groups(TwoLayers(), **kw)
    with pytest.raises(TypeError, match="model"):
        param_groups([1, 2], lr=1.0)


@pytest.mark.parametrize("max_norm,norm_type", [(0.5, 2.0), (1e6, 2.0), (0.3, 1.0), (0.2, float("inf"))])
def test_clip_grad_norm_sparse_matches_dense(max_norm, norm_type):
    """The same gradients, sparse (with repeated rows, as after accumulation) and dense:
    the same returned norm (torch's own on the dense ones) and the same clipped values."""
    g = torch.Generator().manual_seed(5)
    dense_params = [nn.Parameter(torch.zeros(6, 3)), nn.Parameter(torch.zeros(4))]
    sparse_params = [nn.Parameter(torch.zeros(6, 3)), nn.Parameter(torch.zeros(4))]
    rows = torch.tensor([[4, 1, 4]])                      # row 4 twice: uncoalesced
    vals = torch.randn(3, 3, generator=g)
    sp = torch.sparse_coo_tensor(rows, vals, (6, 3), check_invariants=True)
    other = torch.randn(4, generator=g)
    dense_params[0].grad, dense_params[1].grad = sp.to_dense(), other.clone()
    sparse_params[0].grad, sparse_params[1].grad = sp.clone(), other.clone()
    ref_params = [nn.Parameter(torch.zeros(6, 3)), nn.Parameter(torch.zeros(4))]
    ref_params[0].grad, ref_params[1].grad = sp.to_dense(), other.clone()
    want = torch.nn.utils.clip_grad_norm_(ref_params, max_norm, norm_type)
    got_dense = clip_grad_norm_(dense_params, max_norm, norm_type)
    got_sparse = clip_grad_norm_(sparse_params, max_norm, norm_type)
    torch.testing.assert_close(got_dense, want)
    torch.testing.assert_close(got_sparse, want)
    for a, b, r in zip(sparse_params, dense_params, ref_params):
        ga = a.grad.to_dense() if a.grad.is_sparse else a.grad
        torch.testing.assert_close(ga, r.grad)
        torch.testing.assert_close(b.grad, r.grad)
    assert sparse_params[0].grad.is_sparse
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_(dense_params, -1.0)
