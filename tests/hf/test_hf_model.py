"""omni_moe.hf: conversion of dense transformers models, the native OmniMoEForCausalLM,
save/load, generate, router logits, aux loss, expert usage.  Tiny random configs on
CPU; no downloads.  All but the last test run the PyTorch paths (fast); the last runs
the Triton kernels under TRITON_INTERPRET=1."""

import os
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import omni_moe.hf as ohf  # noqa: E402
from omni_moe import UnroutedExpertsWarning  # noqa: E402
from omni_moe.hf import OmniMoEForCausalLM, OmniMoELMConfig, apply_omnimoe  # noqa: E402
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
V = 61  # odd vocabulary


@pytest.fixture(autouse=True)
def torch_path(monkeypatch, request):
    if "kernels" not in request.node.name:
        monkeypatch.setenv("TRITON_INTERPRET", "0")


def small(cls=LlamaConfig, **kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base.update(kw)
    return cls(**base)


def native(**kw):
    opts = dict(num_experts=25, num_experts_per_tok=3, router_norm="layernorm")
    opts.update(kw)
    return OmniMoEForCausalLM(small(OmniMoELMConfig, **opts))


def tokens(b=2, s=11, seed=0):
    return torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(seed))


def randomize_experts(model, seed=3):
    """Non-zero expert tables, so equalities below are not trivially 0 == 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ohf.OmniMoEBlock):
                m.down_embed.weight.copy_(torch.randn(m.down_embed.weight.shape, generator=g) * 0.1)


def train_steps(model, steps=4, lr=1e-2, **kw):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    x = tokens(4, 16, seed=5)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(x, labels=x, **kw)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses


# ------------------------------------------------------------------ conversion
@pytest.mark.parametrize("cls,cfg_cls", [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config),
                                         (MistralForCausalLM, MistralConfig),
                                         (Qwen3ForCausalLM, Qwen3Config)])
@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
def test_conversion_keeps_logits(cls, cfg_cls, norm):
    torch.manual_seed(0)
    model = cls(small(cfg_cls))
    x = tokens()
    for mode in ("eval", "train"):
        getattr(model, mode)()
        with torch.no_grad():
            want = model(x).logits
        if mode == "eval":
            apply_omnimoe(model, layers=[0, 2], num_experts=16, num_experts_per_tok=5, router_norm=norm)
            assert isinstance(model, cls)  # still the original class (a subclass of it)
            assert [type(l.mlp).__name__ for l in model.model.layers] == \
                ["OmniMoEBlock", type(model.model.layers[1].mlp).__name__, "OmniMoEBlock"]
            assert type(model.model.layers[1].mlp) is not ohf.OmniMoEBlock
            assert model.config.moe_layers == [0, 2] and model.config.router_norm == norm
        with torch.no_grad():
            got = model(x).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the dense weights are the shared branch (same Parameter objects)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (40, 32)


def test_conversion_keeps_dense_parameters_and_trains():
    torch.manual_seed(0)
    model = LlamaForCausalLM(small())
    gate = model.model.layers[1].mlp.gate_proj.weight
    apply_omnimoe(model, num_experts=16, num_experts_per_tok=4, expert_precision="bfloat16")
    assert model.config.expert_precision == "bfloat16"
    assert all(model.model.layers[i].mlp.config.expert_precision == "bfloat16" for i in range(2))
    assert model.model.layers[1].mlp.gate_proj.weight is gate
    losses = train_steps(model, steps=6)
    assert losses[-1] < losses[0] - 0.1, losses
    # the zero-initialised expert tables received gradient and moved
    assert model.model.layers[0].mlp.down_embed.weight.abs().sum() > 0


def test_conversion_errors():
    model = LlamaForCausalLM(small())
    with pytest.raises(ValueError, match="num_experts"):
        apply_omnimoe(model, num_experts=0, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        apply_omnimoe(model, num_experts=16, num_experts_per_tok=17)
    with pytest.raises(ValueError, match="layers"):
        apply_omnimoe(model, layers=[3], num_experts=16, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="layers"):
        apply_omnimoe(model, layers=[0, -3], num_experts=16, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="router_norm"):
        apply_omnimoe(model, num_experts=16, num_experts_per_tok=2, router_norm="rms")
    with pytest.raises(TypeError, match="layers"):
        apply_omnimoe(model, layers="0", num_experts=16, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="^expert_precision must be one of"):
        apply_omnimoe(model, num_experts=16, num_experts_per_tok=2, expert_precision="fp8")
    for std, exc in ((-0.1, ValueError), (float("inf"), ValueError), (True, TypeError), ("0.1", TypeError)):
        with pytest.raises(exc, match="^up_embed_std must be a (float|finite number >= 0)"):
            apply_omnimoe(model, num_experts=16, num_experts_per_tok=2, up_embed_std=std)
    # a failed call leaves the model untouched
    assert type(model) is LlamaForCausalLM and model.config.model_type == "llama"
    with pytest.raises(ValueError, match="hidden_act"):
        apply_omnimoe(LlamaForCausalLM(small(hidden_act="gelu_pytorch_tanh")), num_experts=16,
                      num_experts_per_tok=2)
    with pytest.raises(ValueError, match="mlp_bias"):
        apply_omnimoe(LlamaForCausalLM(small(mlp_bias=True)), num_experts=16, num_experts_per_tok=2)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V))
    with pytest.raises(TypeError, match="model"):
        apply_omnimoe(gpt2, num_experts=16, num_experts_per_tok=2)
    with pytest.raises(TypeError, match="model"):
        apply_omnimoe(torch.nn.Linear(2, 2), num_experts=16, num_experts_per_tok=2)
    apply_omnimoe(model, num_experts=16, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="already"):
        apply_omnimoe(model, num_experts=16, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="num_experts"):
        small(OmniMoELMConfig, num_experts=0)
    with pytest.raises(ValueError, match="moe_layers"):
        small(OmniMoELMConfig, num_experts=16, moe_layers=[5])


def _unrouted_warnings(rec):
    return [w for w in rec if issubclass(w.category, UnroutedExpertsWarning)]


def test_non_square_expert_count():
    """num_experts = 12 (not a square): the native model and a converted one build tables
    of 12 rows over the 3 x 3 grid with one warning each (the config's; the layers built
    from it stay quiet), and no token reaches rows 9..11 (NaN there would reach the
    logits)."""
    def poisoned_logits(model):
        blocks = [m for m in model.modules() if isinstance(m, ohf.OmniMoEBlock)]
        assert blocks and all(b.up_embed.weight.shape == (12, 32) and b.num_expert_sqrt == 3
                              for b in blocks)
        with torch.no_grad():
            for b in blocks:
                b.up_embed.weight[9:] = float("nan")
                b.down_embed.weight[9:] = float("nan")
        out = model(tokens(), output_router_logits=True)
        assert all(lp.shape[-1] == 6 for lp in out.router_logits)   # (.., 2N) per layer
        return out.logits

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        native_model = OmniMoEForCausalLM(small(OmniMoELMConfig, num_hidden_layers=2, num_experts=12,
                                                num_experts_per_tok=9))
    assert len(_unrouted_warnings(rec)) == 1
    assert torch.isfinite(poisoned_logits(native_model)).all()
    model = LlamaForCausalLM(small(num_hidden_layers=2))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        apply_omnimoe(model, num_experts=12, num_experts_per_tok=5)
    (w,) = _unrouted_warnings(rec)
    assert w.filename == __file__ and str(w.message).startswith("num_experts=12 is not a perfect square")
    assert torch.isfinite(poisoned_logits(model)).all()
    with pytest.warns(UnroutedExpertsWarning), pytest.raises(ValueError, match=r"\[1, 9\], got 10"):
        apply_omnimoe(LlamaForCausalLM(small()), num_experts=12, num_experts_per_tok=10)


def test_conversion_names_and_integer_scalars():
    """apply_omnimoe takes k under either name, numpy/torch integers anywhere an int goes,
    and records Python ints; errors name the argument as typed."""
    model = LlamaForCausalLM(small())
    apply_omnimoe(model, layers=[np.int64(0), torch.tensor(2)], num_experts=np.int32(16),
                  num_experts_per_token=torch.tensor(3), router_z_loss_coef=0.1)
    cfg = model.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_layers, cfg.router_z_loss_coef) == (16, 3, [0, 2], 0.1)
    assert type(cfg.num_experts) is type(cfg.num_experts_per_tok) is int
    assert all(type(i) is int for i in cfg.moe_layers)
    assert model.model.layers[0].mlp.top_k == 3
    fresh = lambda: LlamaForCausalLM(small())  # noqa: E731
    with pytest.raises(ValueError, match=r"^num_experts_per_token must be in \[1, 16\], got 17$"):
        apply_omnimoe(fresh(), num_experts=16, num_experts_per_token=17)
    with pytest.raises(ValueError, match=r"num_experts_per_token=3 and num_experts_per_tok=2 .*pass one"):
        apply_omnimoe(fresh(), num_experts=16, num_experts_per_tok=2, num_experts_per_token=3)
    apply_omnimoe(fresh(), num_experts=16, num_experts_per_tok=2, num_experts_per_token=2)
    with pytest.raises(TypeError, match="needs num_experts_per_tok"):
        apply_omnimoe(fresh(), num_experts=16)
    with pytest.raises(TypeError, match=r"^layers must hold ints, got bool$"):
        apply_omnimoe(fresh(), layers=[True], num_experts=16, num_experts_per_tok=2)
    with pytest.raises(ValueError, match=r"^router_z_loss_coef must be a finite number >= 0"):
        apply_omnimoe(fresh(), num_experts=16, num_experts_per_tok=2, router_z_loss_coef=-1.0)


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
def test_roundtrip_converted(tmp_path, norm):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(small(Qwen2Config)) if norm == "batchnorm" else LlamaForCausalLM(small())
    apply_omnimoe(model, layers=[1], num_experts=16, num_experts_per_tok=3, router_norm=norm)
    train_steps(model, steps=2)  # moves the tables and the BatchNorm running statistics
    model.eval()
    x = tokens(seed=9)
    with torch.no_grad():
        want = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert loaded.config.moe_layers == [1] and loaded.config.router_norm == norm
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want, rtol=0, atol=0)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is type(model.model)


def test_roundtrip_native_and_auto(tmp_path):
    torch.manual_seed(0)
    model = native(router_norm="batchnorm", moe_layers=[0, 2], router_z_loss_coef=0.01)
    assert type(model.model.layers[1].mlp).__name__ == "LlamaMLP"
    train_steps(model, steps=2)
    model.eval()
    x = tokens(seed=4)
    with torch.no_grad():
        want = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, OmniMoEForCausalLM) and loaded.config.router_z_loss_coef == 0.01
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want, rtol=0, atol=0)
    rn = loaded.model.layers[0].mlp.router_norm_x
    assert int(rn.num_batches_tracked) == 2 and rn.running_var.ne(1).any()
    # bf16 loading keeps the router norms' statistics float32
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert half.model.layers[0].mlp.up_embed.weight.dtype == torch.bfloat16
    assert half.model.layers[0].mlp.router_norm_x.running_mean.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(half(x).logits).all()


def test_from_config_builds_native():
    cfg = small(OmniMoELMConfig, num_experts=16, num_experts_per_tok=2)
    auto = AutoConfig.for_model("omni_moe", num_experts=16, num_experts_per_tok=2)
    assert isinstance(auto, OmniMoELMConfig) and auto.num_experts == 16
    model = AutoModelForCausalLM.from_config(cfg)
    assert isinstance(model, OmniMoEForCausalLM) and isinstance(model, LlamaForCausalLM)
    assert all(isinstance(l.mlp, ohf.OmniMoEBlock) for l in model.model.layers)
    assert isinstance(AutoModel.from_config(cfg), ohf.OmniMoEModel)
    # the native init gives non-zero expert tables (experts contribute from step 0)
    assert model.model.layers[0].mlp.down_embed.weight.std() > 0


# ------------------------------------------------------------------ generation
@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
def test_generate_matches_stepwise_greedy(norm):
    torch.manual_seed(0)
    model = native(router_norm=norm, eos_token_id=None)  # no early stop: compare all tokens
    train_steps(model, steps=1)
    model.eval()
    x = tokens(2, 5, seed=2)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    seq = x
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_one_token_decode_step_matches_full_forward():
    torch.manual_seed(0)
    model = native(router_norm="batchnorm").eval()
    randomize_experts(model)
    x = tokens(2, 8, seed=6)
    with torch.no_grad():
        full = model(x).logits
        pre = model(x[:, :-1], use_cache=True)
        # The cache sits in the output field the family's own model uses on this release
        # ("cache" from 5.24 on, "past_key_values" before).
        dense = LlamaForCausalLM(small())(x[:, :1], use_cache=True)
        field = next(k for k in ("cache", "past_key_values") if k in dense)
        assert field in pre and pre[field] is not None
        assert set(pre.keys()) - {"aux_loss", "router_logits"} <= set(dense.keys()) | {"loss"}
        step = model(x[:, -1:], cache=pre[field], use_cache=True).logits
        again = model(x[:, :-1], use_cache=True)  # the other argument name works too
        with warnings.catch_warnings():  # deprecated where the release renamed it
            warnings.simplefilter("ignore", FutureWarning)
            old_name = model(x[:, -1:], past_key_values=again[field], use_cache=True).logits
        with pytest.raises(ValueError, match="past_key_values"):
            model(x[:, -1:], cache=again[field], past_key_values=again[field])
    torch.testing.assert_close(step[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(old_name, step, rtol=0, atol=0)


# ------------------------------------------------------------------ router outputs
def test_router_logits_aux_loss_and_usage():
    torch.manual_seed(0)
    model = native(moe_layers=[0, 2], router_aux_loss_coef=0.5).eval()
    x = tokens(2, 7, seed=1)
    captured = {}
    layer0 = model.model.layers[0].mlp
    hook = layer0.register_forward_pre_hook(lambda m, a: captured.setdefault("h", a[0].detach()))
    out = model(x, labels=x, output_router_logits=True)
    hook.remove()
    assert len(out.router_logits) == 2
    lp = out.router_logits[0]
    assert lp.shape == (14, 10) and lp.dtype == torch.float32
    px, py = layer0.router_log_probs(captured["h"].reshape(-1, 32))
    torch.testing.assert_close(lp, torch.cat([px, py], -1), rtol=0, atol=0)
    # loss includes coef * aux_loss; without router logits there is neither
    plain = model(x, labels=x)
    assert plain.aux_loss is None and plain.router_logits is None
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * out.aux_loss)
    # aux loss: 1 for uniform marginals, larger for concentrated ones; differentiable
    n, T = 5, 6
    uniform = torch.full((T, 2 * n), -float(torch.log(torch.tensor(5.0))))
    assert abs(ohf.router_aux_loss((uniform,), 3).item() - 1.0) < 1e-6
    peaked = torch.log_softmax(torch.tensor([9.0, 0, 0, 0, 0] * 2).repeat(T, 1).view(T, 2, n), -1).view(T, 2 * n)
    assert ohf.router_aux_loss((peaked,), 1).item() > 4.0
    # padding tokens are left out
    mask = torch.ones(2, 3)
    mask[1, 1:] = 0
    lp6 = torch.cat([peaked[:4], uniform[:2]])
    half = ohf.router_aux_loss((lp6,), 1, mask)
    torch.testing.assert_close(half, ohf.router_aux_loss((peaked[:4],), 1))
    # usage: the routing the layer used, counted
    usage = ohf.expert_usage(out.router_logits, 3)
    _, (_, idx) = layer0(captured["h"], return_routing=True)
    want = torch.bincount(idx.reshape(-1).long(), minlength=25)
    assert torch.equal(usage.counts[0], want)
    assert usage.touched[0] == int((want > 0).sum()) and usage.counts[0].sum() == 14 * 3
    assert usage.num_experts == 25


def test_router_logits_after_conversion_of_a_used_model():
    # transformers installs its recording hooks once per model; converting a model that
    # already recorded hidden states must still record the new layers' router logits.
    # Forget what earlier tests registered, as in a fresh process.
    from transformers.utils import output_capturing as oc

    for key in [k for k in oc._CAN_RECORD_REGISTRY if "OmniMoE" in k]:
        dict.__delitem__(oc._CAN_RECORD_REGISTRY, key)
    model = LlamaForCausalLM(small()).eval()
    x = tokens()
    model(x, output_hidden_states=True)
    apply_omnimoe(model, num_experts=16, num_experts_per_tok=2)
    out = model(x, output_router_logits=True, output_hidden_states=True)
    assert len(out.router_logits) == 3 and len(out.hidden_states) == 4


def test_aux_loss_of_a_model_is_the_mean_over_its_layers():
    """Three OmniMoE layers: the returned aux_loss is the mean of the per-layer losses,
    each from the log-probabilities that layer's router computed (recomputed here from
    the layer's input)."""
    torch.manual_seed(0)
    model = native(num_hidden_layers=4, moe_layers=[0, 2, 3], router_aux_loss_coef=0.5).eval()
    randomize_experts(model)
    blocks = [model.model.layers[i].mlp for i in (0, 2, 3)]
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, 32)))
             for b in blocks]
    x = tokens(2, 9, seed=12)
    out = model(x, labels=x, output_router_logits=True)
    for h in hooks:
        h.remove()
    per_layer = []
    with torch.no_grad():
        for b, h in zip(blocks, seen):
            per_layer.append(ohf.router_aux_loss(torch.cat(b.router_log_probs(h), -1), 3))
    want = torch.stack(per_layer).mean()
    torch.testing.assert_close(out.aux_loss, want, rtol=1e-6, atol=0)
    assert min(per_layer) < out.aux_loss < max(per_layer)


# ------------------------------------------------------------------ router z-loss
def _direct_normalised_logits(h, weights, norms, norm):
    """float64 [l_x | l_y] for input rows ``h`` and gate weights ``weights`` (training
    mode): the gates, then BatchNorm with the batch's biased variance, a per-row
    LayerNorm, or nothing (``norms``: the modules, for their eps)."""
    h = h.double()
    out = []
    for W, nm in zip(weights, norms):
        z = h @ W.double().t()
        if norm == "batchnorm":
            z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + nm.eps)
        elif norm == "layernorm":
            z = (z - z.mean(1, keepdim=True)) / torch.sqrt(z.var(1, unbiased=False, keepdim=True) + nm.eps)
        out.append(z)
    return torch.cat(out, -1)


def _gates_and_norms(block):
    return ((block.router_gate_x.weight.detach(), block.router_gate_y.weight.detach()),
            (block.router_norm_x, block.router_norm_y))


def _direct_z(logits, weight):
    """Mean over axes of the token-weighted mean of logsumexp^2, for one layer."""
    T, n = logits.shape[0], logits.shape[1] // 2
    lse = torch.logsumexp(logits.view(T, 2, n), -1)
    return (lse.square().sum(1) * weight).sum() / (2 * weight.sum())


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", "none"])
def test_z_loss_matches_direct_formula_and_reaches_the_gates(norm):
    """z_loss of a two-OmniMoE-layer model with padding: the formula applied to the
    normalised logits each router computed (recomputed here in float64 from the layer's
    input); loss = LM loss + coef * z_loss; its gradient reaches the router gates (the
    last OmniMoE layer's, whose inputs do not depend on them: checked exactly)."""
    torch.manual_seed(0)
    model = native(router_norm=norm, moe_layers=[0, 2], router_z_loss_coef=0.25).train()
    randomize_experts(model)
    blocks = [model.model.layers[i].mlp for i in (0, 2)]
    x = tokens(2, 7, seed=1)
    mask = torch.ones_like(x)
    mask[1, 4:] = 0
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, 32)))
             for b in blocks]
    out = model(x, attention_mask=mask, labels=x)
    for h in hooks:
        h.remove()
    w = mask.reshape(-1).double()
    direct = [_direct_normalised_logits(h, *_gates_and_norms(b), norm) for b, h in zip(blocks, seen)]
    want = torch.stack([_direct_z(lg, w) for lg in direct]).mean()
    assert out.z_loss.dtype == torch.float32
    torch.testing.assert_close(out.z_loss.double(), want, rtol=1e-5, atol=0)

    last = blocks[1]
    assert out.z_loss.requires_grad
    got = torch.autograd.grad(out.z_loss, (last.router_gate_x.weight, last.router_gate_y.weight),
                              retain_graph=True, allow_unused=True)
    assert all(g is not None for g in got)
    weights, norms = _gates_and_norms(last)
    weights = [W.double().requires_grad_() for W in weights]
    # two layers: this one's share of the mean
    (_direct_z(_direct_normalised_logits(seen[1], weights, norms, norm), w) / 2).backward()
    for g, W in zip(got, weights):
        assert g.abs().max() > 0
        torch.testing.assert_close(g.double(), W.grad, rtol=1e-4, atol=1e-5 * float(W.grad.abs().max()))

    model.config.router_z_loss_coef = 0.0
    plain = model(x, attention_mask=mask, labels=x)
    assert plain.z_loss is None
    torch.testing.assert_close(out.loss, plain.loss + 0.25 * out.z_loss)


def test_z_loss_off_adds_no_work(monkeypatch):
    """With router_z_loss_coef 0 every router takes its usual path (``router_log_probs``:
    the fused prologue on CUDA) and records nothing for a z-loss; with a coefficient,
    read at call time, each OmniMoE layer computes and records its normalised logits
    once per forward instead."""
    usual = []
    orig = ohf.OmniMoEBlock.router_log_probs

    def spy(self, h):
        usual.append(self)
        return orig(self, h)

    monkeypatch.setattr(ohf.OmniMoEBlock, "router_log_probs", spy)
    torch.manual_seed(0)
    model = native(router_norm="batchnorm", moe_layers=[0, 2]).train()
    x = tokens(2, 5)
    recorded = []
    for i in (0, 2):
        model.model.layers[i].mlp.normalized_logits_probe.register_forward_hook(
            lambda *a: recorded.append(1))
    out = model(x, labels=x, output_router_logits=True)
    assert out.z_loss is None and len(usual) == 2 and recorded == []
    model.config.router_z_loss_coef = 0.1
    usual.clear()
    out = model(x, labels=x)
    assert out.z_loss is not None and usual == [] and len(recorded) == 2
    assert out.aux_loss is None  # the two losses are independent


def test_z_loss_and_aux_loss_together_train():
    torch.manual_seed(0)
    model = native(router_norm="batchnorm", router_aux_loss_coef=0.01, router_z_loss_coef=0.01)
    losses = train_steps(model, steps=6, output_router_logits=True)
    assert losses[-1] < losses[0] - 0.1, losses


# ------------------------------------------------------------------ training features
@pytest.mark.parametrize("z_coef", [0.0, 0.1])
@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
def test_gradient_checkpointing_same_gradients(norm, z_coef):
    torch.manual_seed(0)
    a = native(router_norm=norm, router_z_loss_coef=z_coef)
    randomize_experts(a)
    b = native(router_norm=norm, router_z_loss_coef=z_coef)
    b.load_state_dict(a.state_dict())
    if hasattr(b, "activation_checkpointing_enable"):
        b.activation_checkpointing_enable({"use_reentrant": False})
    else:
        b.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = tokens(2, 9, seed=3)
    calls = []
    for m in (a, b):
        m.train()
        n = [0]
        h = m.model.layers[0].mlp.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
        m(x, labels=x).loss.backward()
        h.remove()
        calls.append(n[0])
    assert calls == [1, 2]  # the checkpointed model ran the layer again in backward
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    # the recomputation leaves BatchNorm's running statistics as one forward left them
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=k)


def test_native_training_lowers_loss_with_aux_loss():
    torch.manual_seed(0)
    model = native(router_aux_loss_coef=0.01)
    losses = train_steps(model, steps=6, output_router_logits=True)
    assert losses[-1] < losses[0] - 0.1, losses


def test_sdpa_matches_eager_and_bf16_runs():
    torch.manual_seed(0)
    model = native().eval()
    randomize_experts(model)
    x = tokens()
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(x).logits
        model.set_attn_implementation("sdpa")
        assert model.config._attn_implementation == "sdpa"
        sdpa = model(x).logits
    torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-5)
    model = model.to(torch.bfloat16).train()
    out = model(x, labels=x)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert model.model.layers[0].mlp.up_embed.weight.grad.dtype == torch.bfloat16


def test_torch_compile_forward():
    torch.manual_seed(0)
    model = native().eval()
    randomize_experts(model)
    x = tokens()
    with torch.no_grad():
        want = model(x).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
        got = compiled(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ Triton kernels
@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("z_coef", [0.0, 0.1])
def test_kernels_converted_model_matches_torch_path(monkeypatch, z_coef):
    """The Triton kernels (interpreter on CPU) give the PyTorch path's logits and
    gradients on a converted model (batchnorm, training mode: the fused prologue; with a
    z-loss, the router's PyTorch ops beside the router and expert kernels)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = LlamaForCausalLM(small(num_hidden_layers=1))
    apply_omnimoe(model, num_experts=16, num_experts_per_tok=3, router_norm="batchnorm",
                  router_z_loss_coef=z_coef)
    randomize_experts(model)
    model = model.to(dev).train()
    x = tokens(2, 6).to(dev)
    out = model(x, labels=x)
    out.loss.backward()
    kern = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if dev == "cuda":
        model = model.cpu()
        x = x.cpu()
    ref = model(x, labels=x)
    ref.loss.backward()
    torch.testing.assert_close(out.logits.cpu(), ref.logits, rtol=1e-4, atol=1e-5)
    if z_coef:
        torch.testing.assert_close(out.z_loss.cpu(), ref.z_loss, rtol=1e-5, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(kern[n].cpu(), p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_kernels_block_routes_as_the_layer(monkeypatch, training):
    """An OmniMoEBlock routes as the OmniMoE layer does: through the single-node router
    stage when nothing records its router output, through the log-probabilities (which
    the probe records) when the router-logits probe is hooked.  Both give the layer's
    routing, input and gate gradients and running statistics bitwise, from one route
    plan per call."""
    import copy

    from omni_moe import OmniMoE, OmniMoEConfig

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    plans = []
    plan = OmniMoE.route_plan
    monkeypatch.setattr(OmniMoE, "route_plan", lambda self, h: plans.append(h) or plan(self, h))
    cfg = OmniMoEConfig(32, 40, num_experts=25, num_experts_per_token=3)
    torch.manual_seed(0)
    init = copy.deepcopy(OmniMoE(cfg).state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(13, 32, generator=gen).to(dev)
    g = torch.randn(13, 3, generator=gen).to(dev)

    def route(m):
        m.load_state_dict(init)
        m.zero_grad(set_to_none=True)
        m.to(dev).train(training)
        h = x.clone().requires_grad_()
        plans.clear()
        s, i = m.route(h)
        assert len(plans) == 1
        s.backward(g)
        state = [t.clone() for t in (s, i, h.grad, m.router_gate_x.weight.grad,
                                     m.router_gate_y.weight.grad, *m.buffers())]
        return type(s.grad_fn).__name__, state

    node, want = route(OmniMoE(cfg))
    assert node == "_RouterStageBackward"
    block = ohf.OmniMoEBlock(cfg)
    node_plain, got = route(block)
    assert node_plain == node
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    seen = []
    block.router_probe.register_forward_hook(lambda m, a, o: seen.append(o))
    node_probe, got = route(block)
    assert node_probe != node and len(seen) == 1 and seen[0].shape == (13, 10)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ Trainer
def test_trainer_trains_and_saves(tmp_path):
    """transformers' Trainer trains a native OmniMoE model (loss falls) and its checkpoint
    loads back with the Auto classes to the same logits."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = native()
    data = [{"input_ids": t, "labels": t} for t in tokens(32, 16, seed=7)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8,
                             num_train_epochs=3, learning_rate=1e-2, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) >= 6 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    trainer.save_model(str(tmp_path / "model"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    assert type(back) is OmniMoEForCausalLM
    x = tokens(2, 9, seed=8)
    model.eval()
    back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, rtol=0, atol=0)
