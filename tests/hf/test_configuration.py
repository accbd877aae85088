"""The OmniMoE HF configs: the names users type (the two spellings of k, other MoE
configs' keys, mapped or rejected), integer scalars of numpy and torch, and save/load
round trips of configs built that way.  CPU, no model."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from omni_moe import UnroutedExpertsWarning  # noqa: E402
from omni_moe.hf import OmniMoELMConfig, config_class_for  # noqa: E402
from omni_moe.hf.configuration import ALIASES, FIXED, LAYER_KEYS, REJECTED  # noqa: E402
from transformers import AutoConfig  # noqa: E402

FAMILIES = ["llama", "qwen2", "mistral", "qwen3"]
BASE = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, num_experts=25)


DROP = object()   # make(field=DROP): leave that BASE field out of the call


def fields(cfg) -> dict:
    """What a config holds, less where it was loaded from."""
    return {k: v for k, v in cfg.to_dict().items() if k != "_name_or_path"}


def make(family="llama", **kw):
    args = {**BASE, **kw}
    return config_class_for(family)(**{k: v for k, v in args.items() if v is not DROP})


# ------------------------------------------------------------------ the count k
@pytest.mark.parametrize("family", FAMILIES)
def test_both_spellings_of_k(family):
    canon = make(family, num_experts_per_tok=3)
    alias = make(family, num_experts_per_token=3)
    both = make(family, num_experts_per_tok=3, num_experts_per_token=3)
    assert canon.num_experts_per_tok == alias.num_experts_per_tok == both.num_experts_per_tok == 3
    assert alias.num_experts_per_token == 3          # reads back under either name
    assert canon.to_dict() == alias.to_dict() == both.to_dict()
    assert "num_experts_per_token" not in alias.to_dict()
    alias.num_experts_per_token = 4                  # and writes the canonical field
    assert alias.num_experts_per_tok == 4
    with pytest.raises(ValueError, match=r"num_experts_per_token=4 and num_experts_per_tok=3 .*pass one"):
        make(family, num_experts_per_tok=3, num_experts_per_token=4)
    # the default of the canonical field is not a second value
    assert make(family, num_experts_per_token=16).num_experts_per_tok == 16


def test_messages_use_the_name_typed():
    with pytest.raises(ValueError, match=r"^num_experts_per_token must be in \[1, 25\], got 26$"):
        make(num_experts_per_token=26)
    with pytest.raises(ValueError, match=r"^num_experts_per_tok must be in \[1, 25\], got 26$"):
        make(num_experts_per_tok=26)
    with pytest.raises(TypeError, match=r"^num_experts_per_token must be an int, got float$"):
        make(num_experts_per_token=2.0)
    # A count that is not a perfect square warns once, by the name typed, and bounds k by
    # the N*N routed experts.
    for name in ("num_local_experts", "num_experts"):
        with pytest.warns(UnroutedExpertsWarning) as rec:
            cfg = make(**{"num_experts": DROP, "num_experts_per_tok": 4, name: 8})
        assert len(rec) == 1 and str(rec[0].message).startswith(
            f"{name}=8 is not a perfect square: the router's N x N grid (N = 2)"), rec[0].message
        assert (cfg.num_experts, cfg.num_experts_per_tok) == (8, 4)
    with pytest.warns(UnroutedExpertsWarning), \
            pytest.raises(ValueError, match=r"^num_experts_per_tok must be in \[1, 4\], got 5$"):
        make(num_experts=8, num_experts_per_tok=5)


# ------------------------------------------------------------------ other MoE configs' keys
def test_every_listed_key_is_handled():
    """Each key of the tables maps or is rejected: none is stored as an attribute."""
    for key in [*ALIASES, *LAYER_KEYS, *FIXED]:
        assert key not in make(**{key: _accepted_value(key)}).to_dict(), key
    for key in REJECTED:
        with pytest.raises(ValueError, match=rf"^{key} has no OmniMoE equivalent: .+"):
            make(**{key: 1})


def _accepted_value(key):
    return {"num_experts_per_token": 3, "num_local_experts": 25, "n_routed_experts": 25,
            "shared_expert_intermediate_size": 40, "decoder_sparse_step": 2,
            "mlp_only_layers": [0], "first_k_dense_replace": 1}.get(key, FIXED.get(key, (None,))[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_aliases_map(family):
    assert make(family, num_experts=DROP, num_local_experts=36).num_experts == 36
    assert make(family, num_experts=DROP, n_routed_experts=49).num_experts == 49
    assert make(family, intermediate_size=DROP, shared_expert_intermediate_size=48).intermediate_size == 48
    with pytest.raises(ValueError, match=r"num_local_experts=36 and num_experts=25 .*pass one"):
        make(family, num_local_experts=36)
    with pytest.raises(ValueError, match=r"num_local_experts and n_routed_experts name the same"):
        make(family, num_experts=DROP, num_local_experts=36, n_routed_experts=36)
    with pytest.raises(ValueError, match=r"shared_expert_intermediate_size=48 and intermediate_size=40"):
        make(family, shared_expert_intermediate_size=48)
    # the layer's checks, under the name typed
    with pytest.raises(ValueError, match=r"^shared_expert_intermediate_size must be >= 1, got 0$"):
        make(family, intermediate_size=DROP, shared_expert_intermediate_size=0)
    with pytest.raises(ValueError, match=r"^n_routed_experts must be in \[1, \d+\], got 0$"):
        make(family, num_experts=DROP, n_routed_experts=0)


@pytest.mark.parametrize("kw,layers", [
    (dict(decoder_sparse_step=2), [1, 3, 5]),                            # Qwen-MoE: (i + 1) % step == 0
    (dict(decoder_sparse_step=3), [2, 5]),
    (dict(mlp_only_layers=[0, 5]), [1, 2, 3, 4]),
    (dict(first_k_dense_replace=2), [2, 3, 4, 5]),                      # DeepSeek
    (dict(first_k_dense_replace=0, decoder_sparse_step=1, mlp_only_layers=[]), None),   # all
    (dict(decoder_sparse_step=2, mlp_only_layers=[3], first_k_dense_replace=2), [5]),
    (dict(decoder_sparse_step=2, moe_layers=[5, 3, 1]), [1, 3, 5]),      # agreeing moe_layers
    (dict(first_k_dense_replace=None), None),                             # DeepSeek's None: none dense
])
def test_layer_keys_become_moe_layers(kw, layers):
    cfg = make(**kw)
    assert cfg.moe_layers == layers
    for key in LAYER_KEYS:
        assert key not in cfg.to_dict()


def test_layer_keys_rejected():
    with pytest.raises(ValueError, match=r"moe_layers=\[1\] and decoder_sparse_step=2 choose different layers"):
        make(moe_layers=[1], decoder_sparse_step=2)
    with pytest.raises(ValueError, match=r"moe_layers=None and first_k_dense_replace=1"):
        make(moe_layers=None, first_k_dense_replace=1)
    with pytest.raises(ValueError, match=r"^decoder_sparse_step must be >= 1, got 0$"):
        make(decoder_sparse_step=0)
    with pytest.raises(ValueError, match=r"^mlp_only_layers must be in \[0, 5\], got 6$"):
        make(mlp_only_layers=[6])
    with pytest.raises(TypeError, match=r"^mlp_only_layers must be a list"):
        make(mlp_only_layers=3)


def test_fixed_keys():
    cfg = make(norm_topk_prob=False, router_jitter_noise=0.0, input_jitter_noise=0)
    assert not any(k in cfg.to_dict() for k in FIXED)
    with pytest.raises(ValueError, match=r"^norm_topk_prob: only False is supported \(the omni router"):
        make(norm_topk_prob=True)
    with pytest.raises(ValueError, match=r"^router_jitter_noise: only 0 is supported"):
        make(router_jitter_noise=0.01)


def test_unrelated_keys_still_become_attributes():
    """transformers' own behaviour for keys nobody knows is kept (configs carry metadata)."""
    assert make(my_note="x").my_note == "x"


# ------------------------------------------------------------------ integer scalars
@pytest.mark.parametrize("family", FAMILIES)
def test_numpy_and_torch_integers(family, tmp_path):
    plain = make(family, num_experts_per_tok=3, moe_layers=[1, 4], num_hidden_layers=6)
    scalars = make(family, vocab_size=np.int64(61), hidden_size=torch.tensor(32),
                   intermediate_size=np.int32(40), num_hidden_layers=np.uint8(6),
                   num_experts=np.int64(25), num_experts_per_token=torch.tensor(3, dtype=torch.int16),
                   moe_layers=[np.int64(4), torch.tensor(1)])
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_experts", "num_experts_per_tok"):
        assert type(getattr(scalars, name)) is int, name
    assert scalars.moe_layers == [1, 4] and all(type(i) is int for i in scalars.moe_layers)
    assert scalars == plain
    json.loads(scalars.to_json_string())
    scalars.save_pretrained(tmp_path)
    assert fields(AutoConfig.from_pretrained(tmp_path)) == fields(scalars)


@pytest.mark.parametrize("bad", [True, np.bool_(True), torch.tensor(True), 3.0, torch.tensor([3]),
                                 torch.tensor(3.0), "3"])
def test_not_integers_rejected(bad):
    with pytest.raises(TypeError, match=r"^num_experts_per_tok must be an int, got"):
        make(num_experts_per_tok=bad)


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("family", FAMILIES)
def test_config_built_from_other_names_round_trips(family, tmp_path):
    """A config built from the other spellings saves OmniMoE's names only and loads back
    (through AutoConfig and the class) without tripping the rejection."""
    cfg = make(family, num_experts=DROP, num_local_experts=36, num_experts_per_token=4,
               decoder_sparse_step=2, norm_topk_prob=False, router_z_loss_coef=0.01,
               router_aux_loss_coef=0.001)
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_experts"] == 36 and saved["num_experts_per_tok"] == 4
    assert saved["moe_layers"] == [1, 3, 5] and saved["router_z_loss_coef"] == 0.01
    for key in [*ALIASES, *LAYER_KEYS, *FIXED, *REJECTED, "_given"]:
        assert key not in saved, key
    for back in (AutoConfig.from_pretrained(tmp_path), type(cfg).from_pretrained(tmp_path)):
        assert type(back) is type(cfg)
        assert fields(back) == fields(cfg)


def test_expert_precision_field(tmp_path):
    """``expert_precision`` is checked as the layer config checks it, saved, loaded back
    and handed to every OmniMoE layer's config."""
    from omni_moe.hf.modeling import layer_config

    assert make().expert_precision == "exact"
    with pytest.raises(ValueError, match=r"^expert_precision must be one of"):
        make(expert_precision="float16")
    cfg = make(expert_precision="bfloat16")
    cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["expert_precision"] == "bfloat16"
    back = AutoConfig.from_pretrained(tmp_path)
    assert back.expert_precision == "bfloat16"
    assert layer_config(back).expert_precision == "bfloat16"


def test_z_loss_coef_checked():
    assert make().router_z_loss_coef == 0.0
    with pytest.raises(ValueError, match=r"^router_z_loss_coef must be a finite number >= 0"):
        make(router_z_loss_coef=-0.1)
    with pytest.raises(ValueError, match=r"^router_z_loss_coef must be a finite number >= 0"):
        make(router_z_loss_coef=float("nan"))
    with pytest.raises(TypeError, match=r"^router_z_loss_coef must be a float, got bool"):
        make(router_z_loss_coef=True)


def test_default_config_still_builds():
    """transformers builds a default instance of the class to diff against when saving."""
    cfg = OmniMoELMConfig()
    assert cfg.num_experts == 1024 and cfg.num_experts_per_tok == 16 and cfg.moe_layers is None
