"""omni_moe.ops.row_update and the optimizers on it (omni_moe.optim.RowSGD / RowAdam):
the kernel (CUDA, or the interpreter) and the PyTorch path against the float64 oracle,
RowAdam against torch.optim.SparseAdam over several steps, untouched rows untouched,
poisoned-free outputs (only the given rows change), bad arguments."""

import copy

import pytest
import torch

from omni_moe import OmniMoE, OmniMoEConfig
from omni_moe.ops.row_update import RowUpdateConfig, row_update
from omni_moe.ops.row_update.reference import row_update_reference
from omni_moe.optim import RowAdam, RowSGD, param_groups

BF16, F32 = torch.bfloat16, torch.float32
ULP = {F32: 2.0**-23, BF16: 2.0**-7}


def _case(R, H, D, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(R, H, generator=gen).to(dtype).to(device)
    m = (0.1 * torch.randn(R, H, generator=gen)).to(dtype).to(device)
    v = torch.rand(R, H, generator=gen).mul(0.01).to(dtype).to(device)
    rows = torch.randperm(R, generator=gen)[:D].to(device)
    g = torch.randn(D, H, generator=gen).to(dtype).to(device)
    return p, m, v, rows, g


def _close(got, want, scale, dtype, what, ulps=4):
    # Each output: a few float32 operations on terms of size ``scale``, then one rounding
    # into its dtype (half an ulp of the result).
    err = (got.double() - want).abs()
    tol = 0.5 * ULP[dtype] * want.abs() + ulps * 2.0**-23 * scale.double() + 1e-30
    assert bool((err <= tol).all()), f"{what}: max err {float(err.max()):.3g}"


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("adam", [False, True], ids=["sgd", "adam"])
@pytest.mark.parametrize("H,block", [(40, None), (33, 16), (64, 64)], ids=["H40", "H33-blocks", "H64"])
def test_row_update_against_oracle(device, dtype, adam, H, block):
    _check_against_oracle(device, dtype, adam, H, block)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("adam", [False, True], ids=["sgd", "adam"])
def test_pytorch_path_against_oracle(monkeypatch, dtype, adam):
    """CPU tensors without the interpreter: the PyTorch path, same contract."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _check_against_oracle("cpu", dtype, adam, 40, None)


def _check_against_oracle(device, dtype, adam, H, block):
    R, D = 23, 9
    p, m, v, rows, g = _case(R, H, D, dtype, device, seed=H)
    kw = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, step=3)
    want_p, want_m, want_v = (None if t is None else t.cpu() for t in row_update_reference(
        p, g, rows, exp_avg=m if adam else None, exp_avg_sq=v if adam else None, **kw))
    untouched = torch.ones(R, dtype=torch.bool)
    untouched[rows.cpu()] = False
    p0, m0, v0 = p.clone(), m.clone(), v.clone()
    cfg = None if block is None else RowUpdateConfig(block=block, warps=1)
    row_update(p, g, rows, exp_avg=m if adam else None, exp_avg_sq=v if adam else None, config=cfg, **kw)
    p0d, m0d, v0d, gd = p0.cpu().double(), m0.cpu().double(), v0.cpu().double(), torch.zeros(R, H).double()
    gd[rows.cpu()] = g.cpu().double()
    _close(p.cpu(), want_p, p0d.abs() + (want_p - p0d).abs(), dtype, "param")
    assert torch.equal(p.cpu()[untouched], p0.cpu()[untouched]), "a row outside the gradient changed"
    if adam:
        _close(m.cpu(), want_m, m0d.abs() + gd.abs(), dtype, "exp_avg")
        _close(v.cpu(), want_v, v0d.abs() + gd.square(), dtype, "exp_avg_sq")
        assert torch.equal(m.cpu()[untouched], m0.cpu()[untouched])
        assert torch.equal(v.cpu()[untouched], v0.cpu()[untouched])
    else:
        assert torch.equal(m, m0) and torch.equal(v, v0)


def test_row_update_empty_and_errors(device):
    p, m, v, rows, g = _case(6, 8, 3, F32, device, seed=1)
    before = p.clone()
    row_update(p, g[:0], rows[:0], lr=0.1)
    assert torch.equal(p, before)
    bad = [
        (dict(exp_avg=m), ValueError, "together"),
        (dict(config=RowUpdateConfig(block=3)), ValueError, "config.block"),
        (dict(config={"block": 4}), TypeError, "RowUpdateConfig"),
    ]
    for kw, exc, match in bad:
        with pytest.raises(exc, match=match):
            row_update(p, g, rows, lr=0.1, **kw)
    with pytest.raises(ValueError, match="rows"):
        row_update(p, g, rows[:2], lr=0.1)
    with pytest.raises(TypeError, match="rows"):
        row_update(p, g, rows.float(), lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        row_update(p, g, rows, lr=-1.0)
    with pytest.raises(ValueError, match="step"):
        row_update(p, g, rows, lr=0.1, exp_avg=m, exp_avg_sq=v, step=0)
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        row_update(p, g, rows, lr=0.1, exp_avg=m, exp_avg_sq=v, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="exp_avg_sq"):
        row_update(p, g, rows, lr=0.1, exp_avg=m, exp_avg_sq=v[:2])
    with pytest.raises(ValueError, match="values"):
        row_update(p, g[:, :4], rows, lr=0.1)


def _sparse_layer(device, seed=0):
    torch.manual_seed(seed)
    cfg = OmniMoEConfig(hidden_size=16, intermediate_size=24, num_experts=64, num_experts_per_token=3,
                        router_norm="layernorm", sparse_expert_grad=True)
    return OmniMoE(cfg).to(device)


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_optimizers_against_torch(device, opt):
    """Four steps of a layer with sparse expert gradients: RowAdam's tables against
    SparseAdam's and RowSGD's against SGD's (float32), the rest of the layer by Adam."""
    layer = _sparse_layer(device)
    twin = copy.deepcopy(layer)
    ours_rest, ours_tab = param_groups(layer, lr=1e-2, split=True)
    ref_rest, ref_tab = param_groups(twin, lr=1e-2, split=True)
    for grp in (ours_tab, ref_tab):
        grp.pop("weight_decay")
    if opt == "adam":
        ours = RowAdam([ours_tab], betas=(0.9, 0.99), eps=1e-8)
        ref = torch.optim.SparseAdam([ref_tab], betas=(0.9, 0.99), eps=1e-8)
    else:
        ours, ref = RowSGD([ours_tab]), torch.optim.SGD([ref_tab])
    dense = [torch.optim.Adam([ours_rest]), torch.optim.Adam([ref_rest])]
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        x = torch.randn(12, 16, generator=gen).to(device)
        for mod, o, d in ((layer, ours, dense[0]), (twin, ref, dense[1])):
            mod(x).square().mean().backward()
            o.step()
            d.step()
            o.zero_grad(set_to_none=True)
            d.zero_grad(set_to_none=True)
    for (n, p), (_, q) in zip(layer.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7, msg=n)
    if opt == "adam":
        for p, q in zip(ours_tab["params"], ref_tab["params"]):
            assert ours.state[p]["step"] == 4
            torch.testing.assert_close(ours.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=2e-6, atol=1e-9)
            torch.testing.assert_close(ours.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"],
                                       rtol=2e-6, atol=1e-12)


def test_uncoalesced_gradient_sums_duplicates(device):
    """A gradient accumulated over two backward passes repeats rows: they are summed."""
    p = torch.zeros(5, 3, device=device, requires_grad=True)
    i = torch.tensor([[1, 3, 1]])
    vals = torch.tensor([[1.0, 2, 3], [4, 5, 6], [10, 20, 30]])
    p.grad = torch.sparse_coo_tensor(i, vals, (5, 3), check_invariants=True).to(device)
    RowSGD([p], lr=0.5).step()
    want = torch.zeros(5, 3)
    want[1] = -0.5 * torch.tensor([11.0, 22, 33])
    want[3] = -0.5 * torch.tensor([4.0, 5, 6])
    assert torch.equal(p.detach().cpu(), want)


def test_optimizer_argument_errors():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    for kw, exc, match in ((dict(lr=-1.0), ValueError, "lr"), (dict(lr="x"), TypeError, "lr"),
                           (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
                           (dict(betas=0.9), TypeError, "betas"), (dict(eps=-1e-8), ValueError, "eps")):
        with pytest.raises(exc, match=match):
            RowAdam([p], **kw)
    with pytest.raises(ValueError, match="lr"):
        RowSGD([p], lr=-0.1)
    p.grad = torch.ones(4, 3)
    with pytest.raises(TypeError, match="sparse gradients"):
        RowAdam([p]).step()
