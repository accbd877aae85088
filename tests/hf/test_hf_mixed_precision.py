"""transformers' mixed-precision training of OmniMoE models: ``Trainer(bf16=True)`` (float32
weights, the step under ``torch.autocast``), every router norm, on CPU.  The layer's
autocast arithmetic (dense and sparse expert gradients) is checked in
tests/layers/test_autocast.py; the GPU runs (bf16 and fp16) are in docs/benchmarks.md."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_hf_model import native, tokens  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402


@pytest.mark.parametrize("norm", ("layernorm", "batchnorm", "none"))
def test_trainer_bf16_trains(tmp_path, norm):
    """A few Trainer(bf16=True) steps: the loss falls, the weights stay float32 and
    finite, and the forward ran under autocast (the layers' outputs were bf16)."""
    torch.manual_seed(0)
    model = native(router_norm=norm)
    seen = []
    for m in model.modules():
        if type(m).__name__ == "OmniMoEBlock":
            m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    data = [{"input_ids": t, "labels": t} for t in tokens(32, 16, seed=7)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8,
                             num_train_epochs=3, learning_rate=1e-2, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, bf16=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert seen and set(seen) == {torch.bfloat16}
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
