"""Clear errors for bad input: OmniMoE.forward's checks, unsupported tensor layouts
(sparse, nested) in every public function, integer arguments (numpy and torch integer
scalars accepted, bool rejected) and the layer config's two names of k.  PyTorch paths
only (no kernel runs)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from omni_moe import OmniMoE, OmniMoEConfig, omni_expert, omni_router, swiglu
from omni_moe.ops import swiglu_mlp
from omni_moe.ops._checks import UnroutedExpertsWarning, check_choice, check_float, check_int, check_pow2


pytestmark = pytest.mark.usefixtures("torch_path")


def layer(norm="batchnorm", dtype=torch.float32):
    torch.manual_seed(0)
    return OmniMoE(OmniMoEConfig(16, 24, "silu", 16, 3, router_norm=norm)).to(dtype)


# ----------------------------------------------------------------------------- OmniMoE
@pytest.mark.parametrize("bad,exc,match", [
    ([0.0] * 16, TypeError, "hidden_states must be a torch.Tensor"),
    (torch.ones(2, 16, dtype=torch.int64), TypeError, "hidden_states must be a floating-point tensor, got torch.int64"),
    (torch.ones(2, 16, dtype=torch.bool), TypeError, "floating-point"),
    (torch.randn(2, 15), ValueError, r"hidden_states must have shape \(\.\.\., hidden_size=16\), got \(2, 15\)"),
    (torch.tensor(1.0), ValueError, "hidden_size=16"),
])
def test_layer_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        layer()(bad)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float64), ids=str)
def test_layer_dtype_mismatch_names_both(dtype):
    with pytest.raises(TypeError, match=rf"hidden_states has dtype {dtype} but OmniMoE's parameters are torch.float32"):
        layer()(torch.randn(2, 16).to(dtype))
    with pytest.raises(TypeError, match=rf"has dtype torch.float32 but OmniMoE's parameters are torch.bfloat16"):
        layer(dtype=torch.bfloat16)(torch.randn(2, 16))


def test_layer_double_module_names_module_dtype():
    m = layer().double()
    with pytest.raises(TypeError, match=r"OmniMoE's parameters are torch.float64; .*\.float\(\)"):
        m(torch.randn(2, 16, dtype=torch.float64))


def test_layer_autocast_mixed_dtypes_allowed():
    m = layer()
    x = torch.randn(2, 5, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.shape == (2, 5, 16) and out.is_floating_point()


def test_layer_one_token_training():
    x = torch.randn(1, 1, 16)
    with pytest.raises(ValueError, match=r"router_norm='batchnorm' needs at least 2 tokens in training mode"):
        layer()(x)
    # Handled where it is well defined: eval mode (running statistics), no norm, 2 tokens,
    # an empty batch.
    assert layer().eval()(x).shape == (1, 1, 16)
    assert layer("none")(x).shape == (1, 1, 16)
    assert layer()(torch.randn(2, 16)).shape == (2, 16)
    assert layer()(torch.randn(0, 16)).shape == (0, 16)


# ------------------------------------------------------------------- tensor layouts
def _sparse_variants(t):
    yield "sparse_coo", t.to_sparse()
    if t.dim() == 2:
        yield "sparse_csr", t.to_sparse_csr()


def _calls():
    """(argument name, function of that argument) for every tensor argument."""
    T, N, H, E, k, I = 4, 3, 8, 9, 2, 6
    x, y = torch.randn(T, N), torch.randn(T, N)
    h, up, down = torch.randn(T, H), torch.randn(E, H), torch.randn(E, H)
    w, idx = torch.rand(T, k), torch.randint(0, E, (T, k))
    g, u = torch.randn(T, I), torch.randn(T, I)
    wg, wu, wd = torch.randn(I, H), torch.randn(I, H), torch.randn(H, I)
    m = layer()
    ex = dict(hidden_states=h, up_weights=up, down_weights=down, routing_weights=w, indices=idx)
    yield "router_logits_x", x, lambda a: omni_router(a, y, N, k)
    yield "router_logits_y", y, lambda a: omni_router(x, a, N, k)
    for name in ex:
        yield name, ex[name], lambda a, name=name: omni_expert(**{**ex, name: a})
    yield "gate", g, lambda a: swiglu(a, u)
    yield "up", u, lambda a: swiglu(g, a)
    mlp = dict(hidden_states=h, gate_weight=wg, up_weight=wu, down_weight=wd)
    for name in mlp:
        yield name, mlp[name], lambda a, name=name: swiglu_mlp(**{**mlp, name: a})
    yield "hidden_states", torch.randn(T, 16), m


@pytest.mark.parametrize("case", range(14))
def test_sparse_layouts_rejected(case):
    name, t, fn = list(_calls())[case]
    fn(t)  # the dense tensor is fine
    for layout, sp in _sparse_variants(t):
        with pytest.raises(TypeError, match=rf"^{name} must be a dense \(strided\) tensor, got layout"):
            fn(sp)


def test_nested_rejected():
    nt = torch.nested.nested_tensor([torch.randn(2, 16), torch.randn(3, 16)])
    with pytest.raises(TypeError, match="hidden_states must be a dense tensor, got a nested tensor"):
        layer()(nt)
    with pytest.raises(TypeError, match="gate must be a dense tensor"):
        swiglu(nt, nt)


def test_meta_tensors_give_shapes():
    """Meta tensors are dense: the PyTorch paths run on them and give output shapes."""
    x = torch.randn(5, 4, device="meta")
    s, i = omni_router(x, x, 4, 3)
    assert s.shape == (5, 3) and i.dtype == torch.int32 and s.device.type == "meta"
    out = omni_expert(torch.randn(5, 8, device="meta"), torch.randn(16, 8, device="meta"),
                      torch.randn(16, 8, device="meta"), torch.rand(5, 3, device="meta"),
                      torch.zeros(5, 3, dtype=torch.int64, device="meta"))
    assert out.shape == (5, 8)
    assert swiglu(x, x).shape == (5, 4)
    assert layer().to("meta")(torch.randn(2, 3, 16, device="meta")).shape == (2, 3, 16)


# ------------------------------------------------------------------- integer scalars
INTS = [3, np.int8(3), np.int64(3), np.uint16(3), torch.tensor(3), torch.tensor(3, dtype=torch.int32),
        torch.tensor(3, dtype=torch.uint8)]
NOT_INTS = [True, np.bool_(False), torch.tensor(True), 3.0, np.float32(3.0), torch.tensor(3.0),
            torch.tensor([3]), "3", None]


@pytest.mark.parametrize("v", INTS, ids=repr)
def test_check_int_accepts_integer_scalars(v):
    got = check_int("count", v, 1, 5)
    assert got == 3 and type(got) is int


@pytest.mark.parametrize("v", NOT_INTS, ids=repr)
def test_check_int_rejects_the_rest(v):
    with pytest.raises(TypeError, match=rf"^count must be an int, got {type(v).__name__}$"):
        check_int("count", v)


def test_check_int_ranges():
    with pytest.raises(ValueError, match=r"^n must be in \[1, 5\], got 6$"):
        check_int("n", np.int64(6), 1, 5)
    with pytest.raises(ValueError, match=r"^n must be >= 1, got 0$"):
        check_int("n", 0, 1)
    with pytest.raises(ValueError, match=r"^n must be <= 5, got 6$"):
        check_int("n", 6, hi=5)
    assert check_int("n", -7) == -7
    with pytest.raises(ValueError, match=r"^t must be a power of two >= 16, got 24$"):
        check_pow2("t", np.int64(24), 16)
    assert type(check_pow2("t", torch.tensor(32), 16)) is int


def test_router_takes_integer_scalars():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    want = omni_router(x, y, 5, 4)
    for n, k in ((np.int64(5), np.int32(4)), (torch.tensor(5), torch.tensor(4))):
        got = omni_router(x, y, n, k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(TypeError, match="^num_experts_per_token must be an int, got bool$"):
        omni_router(x, y, 5, True)
    with pytest.raises(TypeError, match="^num_expert_sqrt must be an int, got float$"):
        omni_router(x, y, 5.0, 4)


# ------------------------------------------------------------------- OmniMoEConfig names
def test_layer_config_from_integer_scalars():
    plain = OmniMoEConfig(16, 24, "silu", 16, 3)
    scalars = OmniMoEConfig(np.int64(16), torch.tensor(24), "silu", np.uint8(16), np.int32(3))
    assert scalars == plain and repr(scalars) == repr(plain)
    d = dataclasses.asdict(scalars)
    assert all(type(d[k]) is int for k in ("hidden_size", "intermediate_size", "num_experts",
                                           "num_experts_per_token"))
    assert json.loads(json.dumps(d)) == dataclasses.asdict(plain)
    OmniMoE(scalars)


def test_layer_config_k_alias():
    """num_experts_per_tok (transformers' name) is a keyword alias of the 5th field: the
    positional order, asdict, ==, repr and replace see only the canonical field."""
    canon = OmniMoEConfig(16, 24, "silu", 16, 3, "none")
    alias = OmniMoEConfig(16, 24, "silu", 16, router_norm="none", num_experts_per_tok=3)
    both = OmniMoEConfig(16, 24, "silu", 16, 3, "none", num_experts_per_tok=np.int64(3))
    assert canon == alias == both and repr(canon) == repr(alias)
    assert [f.name for f in dataclasses.fields(alias)][:5] == [
        "hidden_size", "intermediate_size", "hidden_act", "num_experts", "num_experts_per_token"]
    assert dataclasses.asdict(alias) == dataclasses.asdict(canon)
    assert "num_experts_per_tok" not in dataclasses.asdict(alias)
    assert OmniMoEConfig(**dataclasses.asdict(alias)) == canon
    assert alias.num_experts_per_tok == 3 and type(both.num_experts_per_token) is int
    assert dataclasses.replace(alias, num_experts_per_token=5).num_experts_per_tok == 5
    with pytest.raises(ValueError, match="pass one"):     # replace copies the canonical k too
        dataclasses.replace(alias, num_experts_per_tok=5)
    alias.num_experts_per_tok = 4
    assert alias.num_experts_per_token == 4
    with pytest.raises(ValueError, match=r"num_experts_per_tok=4 and num_experts_per_token=3 .*pass one"):
        OmniMoEConfig(16, 24, "silu", 16, 3, num_experts_per_tok=4)
    with pytest.raises(ValueError, match=r"^num_experts_per_tok must be in \[1, 16\], got 17$"):
        OmniMoEConfig(16, 24, "silu", 16, num_experts_per_tok=17)
    with pytest.raises(ValueError, match=r"^num_experts_per_token must be in \[1, 16\], got 17$"):
        OmniMoEConfig(16, 24, "silu", 16, 17)
    with pytest.raises(TypeError, match=r"^num_experts_per_token \(or num_experts_per_tok\) is required$"):
        OmniMoEConfig(16, 24, "silu", 16)
    with pytest.raises(TypeError, match="positional"):
        OmniMoEConfig(16, 24, "silu", 16, 3, "none", None, False, "exact", 3)   # the alias is keyword-only


def test_layer_config_typed_names():
    """``OmniMoEConfig.typed`` checks what the constructor checks, calling each field by
    the caller's name for it, and its warning points at the caller's line."""
    names = {"num_experts": "--experts", "num_experts_per_tok": "--k", "router_norm": "--norm",
             "hidden_act": "act"}
    good = dict(hidden_size=16, intermediate_size=24, hidden_act="silu", num_experts=16,
                num_experts_per_tok=3, router_norm="none")
    assert OmniMoEConfig.typed(names, **good) == OmniMoEConfig(16, 24, "silu", 16, 3, "none")
    for field, value, exc, msg in [
        ("num_experts", 0, ValueError, r"^--experts must be in \[1, \d+\], got 0$"),
        ("num_experts", None, TypeError, r"^--experts is required"),
        ("num_experts_per_tok", 17, ValueError, r"^--k must be in \[1, 16\], got 17$"),
        ("num_experts_per_tok", 2.0, TypeError, r"^--k must be an int, got float$"),
        ("router_norm", "rms", ValueError, r"^--norm must be one of .*, got 'rms'$"),
        ("hidden_act", 1, TypeError, r"^act must be a str"),
        ("hidden_size", 0, ValueError, r"^hidden_size must be >= 1, got 0$"),
    ]:
        with pytest.raises(exc, match=msg):
            OmniMoEConfig.typed(names, **dict(good, **{field: value}))
    with pytest.warns(UnroutedExpertsWarning) as rec:
        OmniMoEConfig.typed(names, **dict(good, num_experts=17))
    assert len(rec) == 1 and rec[0].filename == __file__
    assert str(rec[0].message).startswith("--experts=17 is not a perfect square")
    # The names do not outlive the call: the next plain construction uses the fields'.
    with pytest.raises(ValueError, match=r"^num_experts_per_tok must be in"):
        OmniMoEConfig(16, 24, "silu", 16, num_experts_per_tok=17)


def test_choice_and_float_checks():
    assert check_choice("mode", "b", ("a", "b")) == "b"
    with pytest.raises(ValueError, match=r"^mode must be one of \('a', 'b'\), got 'c'$"):
        check_choice("mode", "c", ("a", "b"))
    with pytest.raises(TypeError, match=r"^mode must be a str, one of \('a', 'b'\), got int$"):
        check_choice("mode", 1, ("a", "b"))
    assert check_float("coef", 0) == 0 and check_float("coef", -2.5) == -2.5
    assert check_float("coef", 0.0, 0.0) == 0.0
    for bad in (True, "1", None, torch.tensor(1.0)):
        with pytest.raises(TypeError, match=r"^coef must be a float, got "):
            check_float("coef", bad)
    for bad in (-1e-9, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^coef must be a finite number >= 0, got "):
            check_float("coef", bad, 0)


# ------------------------------------------------------------------- launch configs
def test_launch_configs_take_integer_scalars():
    """A launch config built from numpy/torch integers is checked like one of ints and
    comes back holding ints (what the kernels' constexprs get); bools are rejected."""
    from omni_moe.ops.expert import kernels as ek
    from omni_moe.ops.router import backward as rb, fullscan as fs
    from omni_moe.ops.router_norm import kernels as rn
    from omni_moe.ops.swiglu import kernels as sk

    i = np.int64
    cases = [
        (sk._check_config, sk.SwigluConfig(block_m=i(4), block_i=torch.tensor(32), warps=i(2)), "warps"),
        (fs._check_config, fs.FullscanConfig(split=True, chunk=i(64), merge_block=i(16)), "chunk"),
        (rb._check_config, rb.BackwardConfig(bn=i(32), c=i(8), tile_t=i(4), unroll=i(4), warps=i(4)), "c"),
        (rn._check_config, rn.RouterNormConfig(splits=i(3), stats_tile=(i(64), i(32)), row_block=i(2)), "splits"),
    ]
    tile = ek.Tile(rows=i(2), cols=i(32), unroll=i(2), warps=i(4), per_program=i(0))
    cases.append((ek._check_config, ek.ExpertConfig("token", tile, tile, tile, tile), "token"))
    for check, cfg, field in cases:
        got = check(cfg)
        assert got == cfg and type(got) is type(cfg) and got is not cfg
        assert check(got) is got       # a config of ints is used as is (no copy per call)
        values = [v for f in dataclasses.fields(got) for v in _leaves(getattr(got, f.name))]
        assert all(type(v) in (int, bool, str) for v in values), got
        with pytest.raises(TypeError, match=rf"^config\.{field}.* must be an int, got bool$"):
            bad = dataclasses.replace(cfg, **{field: True}) if field != "token" else \
                dataclasses.replace(cfg, token=dataclasses.replace(tile, rows=True))
            check(bad)


def _leaves(v):
    if dataclasses.is_dataclass(v):
        return [x for f in dataclasses.fields(v) for x in _leaves(getattr(v, f.name))]
    if isinstance(v, tuple):
        return [x for e in v for x in _leaves(e)]
    return [v]
