"""Where a tensor's work runs: the Triton kernels or the PyTorch path.

The library's contract: CUDA tensors run the Triton kernels; CPU tensors run the
PyTorch path, unless ``TRITON_INTERPRET=1`` is set, in which case they run the Triton
kernels through Triton's interpreter (that is how CI tests every kernel).
"""

from __future__ import annotations

import contextlib
import os

import torch


def interpret_mode() -> bool:
    """True when Triton's interpreter is switched on for this process."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t``'s work should go through the Triton kernels."""
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and interpret_mode()


def autocast_off(t: torch.Tensor):
    """A context in which ``torch.autocast`` is off on ``t``'s device: for the ops whose
    GEMMs must keep their float32 operands and results when the caller runs them under
    autocast (a no-op context where autocast is off already)."""
    dev = t.device.type
    if dev not in ("cuda", "cpu") and not torch.amp.is_autocast_available(dev):
        return contextlib.nullcontext()
    if not torch.is_autocast_enabled(dev):
        return contextlib.nullcontext()
    return torch.autocast(dev, enabled=False)


def device_info(device: torch.device) -> tuple[int, int]:
    """(multiprocessors, compute-capability major) of ``device``.  The interpreter gets
    (2, 0): persistent grids sized from it stay small, so each program still loops over
    several tiles, as on a GPU."""
    if device.type != "cuda":
        return 2, 0
    p = torch.cuda.get_device_properties(device)
    return p.multi_processor_count, p.major
