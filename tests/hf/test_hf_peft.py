"""peft on omni_moe.hf models: LoRA on attention, shared MLP and router gates computes
what the merged weights compute (forward and LoRA gradients), the docs/hf.md recipe runs
as written, LoRA on the expert tables is refused, ``modules_to_save`` trains them.
Tiny random models on CPU (PyTorch path; the kernel paths of wrapped modules are
tests/layers/test_wrapped_modules.py)."""

import copy
import os
import re

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import omni_moe.hf as ohf  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V = 61
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "router_gate_x", "router_gate_y"]


pytestmark = pytest.mark.usefixtures("torch_path")


def native(norm="batchnorm", seed=0):
    torch.manual_seed(seed)
    cfg = ohf.OmniMoELMConfig(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              num_experts=25, num_experts_per_tok=3, router_norm=norm)
    return ohf.OmniMoEForCausalLM(cfg)


def tokens(b=3, s=9, seed=1):
    return torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(seed))


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
def test_lora_matches_merged_weights(norm):
    """Random (non-zero) LoRA factors on every Linear target: the adapted model's loss and
    logits equal those of the model with merged weights W + s*B*A, and each factor's
    gradient is the merged weight's gradient G pulled back (dB = s G A^T, dA = s B^T G),
    on two training steps."""
    pm = get_peft_model(native(norm), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                  init_lora_weights=False))
    loras = lora_modules(pm)
    assert {n.rsplit(".", 1)[-1] for n in loras} == set(TARGETS)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        x = tokens(seed=10 + step)
        merged = copy.deepcopy(pm).merge_and_unload().train()
        for p in merged.parameters():
            p.requires_grad_(True)
        pm.train()
        out = pm(x, labels=x)
        ref = merged(x, labels=x)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        out.loss.backward()
        ref.loss.backward()
        merged_mods = dict(merged.named_modules())
        for name, m in loras.items():
            g = merged_mods[name.removeprefix("base_model.model.")].weight.grad
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            s = m.scaling["default"]
            torch.testing.assert_close(b.grad, s * g @ a.detach().t(), rtol=1e-4, atol=1e-6, msg=name)
            torch.testing.assert_close(a.grad, s * b.detach().t() @ g, rtol=1e-4, atol=1e-6, msg=name)
            assert m.base_layer.weight.grad is None  # frozen
        opt.step()
        opt.zero_grad()


def _recipe():
    text = open(os.path.join(REPO, "docs", "hf.md"), encoding="utf-8").read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "get_peft_model(" in b]
    assert len(blocks) == 1, "docs/hf.md must hold one peft recipe"
    return blocks[0]


def test_docs_recipe_runs_as_written(tmp_path, monkeypatch):
    """docs/hf.md's peft recipe, executed as written (in three pieces, to look at the
    model in between) on a tiny saved model: the adapters train, only they change, the
    adapter saves and loads back to the trained model's logits, and merging gives the
    same logits with plain Linear modules."""
    code = _recipe()
    train, rest = code.split("\nbase = ", 1)
    load, merge = ("base = " + rest).split("\nmerged = ", 1)
    monkeypatch.chdir(tmp_path)
    saved = native("layernorm").eval()
    saved.save_pretrained("omni-moe-model")
    x = tokens(4, 12, seed=3)
    ns = {"batches": [x] * 8}
    exec(train, ns)
    trained = ns["model"].eval()
    assert isinstance(trained, PeftModel)
    assert {n.rsplit(".", 1)[-1] for n in lora_modules(trained)} == set(TARGETS)
    with torch.no_grad():
        want = trained(x).logits
        loss, base_loss = trained(x, labels=x).loss.item(), saved(x, labels=x).loss.item()
    assert loss < base_loss - 0.05, (base_loss, loss)  # the adapters trained ...
    for name, m in lora_modules(trained).items():      # ... every one of them (B starts at 0)
        assert m.lora_B["default"].weight.abs().max() > 0, name
    exec(load, ns)
    loaded = ns["model"]
    assert isinstance(loaded, PeftModel) and loaded is not trained
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want, rtol=0, atol=0)
    exec("merged = " + merge, ns)
    merged = ns["merged"]
    assert not lora_modules(merged)
    for block in merged.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj", "router_gate_x", "router_gate_y"):
            assert type(getattr(block.mlp, name)) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, want, rtol=1e-5, atol=1e-5)
    # only the adapters trained: every weight of the base model is the saved one
    trained_base = {k.replace("base_layer.", ""): v for k, v in trained.base_model.model.state_dict().items()
                    if "lora_" not in k}
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(trained_base[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("table", ["up_embed", "down_embed"])
def test_lora_on_expert_tables_raises(table):
    pm = get_peft_model(native(), LoraConfig(r=4, target_modules=["q_proj", table]))
    x = tokens()
    with pytest.raises(ValueError, match=rf"^{table} is a peft\..*modules_to_save") as e:
        pm(x)
    assert "\n" not in str(e.value)


def test_modules_to_save_trains_expert_tables(tmp_path):
    """``modules_to_save=["up_embed", "down_embed"]``: the layer uses the trainable copies
    (they get gradients and change; the originals do not), ``disable_adapter()`` uses the
    originals again, and the copies save and load with the adapter."""
    model = native("layernorm")  # no running statistics: the originals alone define the model
    before = copy.deepcopy(model).eval()
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"],
                                          modules_to_save=["up_embed", "down_embed"]))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = tokens(4, 12, seed=4)
    pm.train()
    for _ in range(3):
        pm(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    mlp = pm.base_model.model.model.layers[0].mlp
    copy_w = mlp.up_embed.modules_to_save["default"].weight
    assert not torch.equal(copy_w, before.model.layers[0].mlp.up_embed.weight)
    assert torch.equal(mlp.up_embed.original_module.weight, before.model.layers[0].mlp.up_embed.weight)
    with torch.no_grad():
        got = pm(x).logits
        with pm.disable_adapter():
            torch.testing.assert_close(pm(x).logits, before(x).logits, rtol=0, atol=0)
        pm.save_pretrained(tmp_path / "adapter")
        back = PeftModel.from_pretrained(native("layernorm"), tmp_path / "adapter").eval()
        torch.testing.assert_close(back(x).logits, got, rtol=0, atol=0)
