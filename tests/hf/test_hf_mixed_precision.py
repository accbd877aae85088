"""transformers' mixed-precision training of OmniMoE models: ``Trainer(bf16=True)`` (float32
weights, the step under ``torch.autocast``), every router norm, on CPU.  The layer's
autocast arithmetic (dense and sparse expert gradients, the Triton kernels included) is
checked in tests/layers/test_autocast.py; the GPU runs (bf16 and fp16) are in
docs/benchmarks.md.  Here the Trainer's loop runs the PyTorch paths (a dozen steps); one
step runs the kernels through the interpreter (a bf16 step of the tiny model costs ~15 s
there)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_hf_model import native, tokens  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _train(tmp_path, norm, steps):
    torch.manual_seed(0)
    model = native(router_norm=norm)
    seen = []
    for m in model.modules():
        if type(m).__name__ == "OmniMoEBlock":
            m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    data = [{"input_ids": t, "labels": t} for t in tokens(32, 16, seed=7)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8,
                             max_steps=steps, learning_rate=1e-2, warmup_steps=0,
                             lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, bf16=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16}
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
        assert p.grad is None or p.grad.dtype == torch.float32, name
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("norm", ("layernorm", "batchnorm", "none"))
def test_trainer_bf16_trains(tmp_path, monkeypatch, norm):
    """Twelve Trainer(bf16=True) steps on the PyTorch paths: the forward ran under autocast
    (the layers' outputs were bf16), the weights stay float32 and finite, the loss falls."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    losses = _train(tmp_path, norm, 12)
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs the kernels")
def test_trainer_bf16_step_through_the_kernels(tmp_path):
    """One Trainer(bf16=True) step through the Triton kernels (CUDA or the interpreter)."""
    losses = _train(tmp_path, "batchnorm", 1)
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))
