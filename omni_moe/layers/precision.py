"""How an OmniMoE layer computes under ``torch.autocast`` (mixed precision).

The standard recipe keeps float32 parameters and runs the forward under
``torch.autocast(device, dtype=bf16 | fp16)`` (``Trainer(bf16=True)``, accelerate, every
AMP loop).  torch.amp casts the inputs of the ops on its lower-precision list (``linear``,
``matmul``, ...) and runs precision-sensitive ops (softmax, norms, reductions) in float32.
The layer follows the same split, op by op, with the autocast dtype ``c``:

======================================  =================================================
the layer's input h                     cast to ``c`` by the router stage and by the
                                        output stage (as autocast casts each op's input);
                                        the input gradient comes back in h's dtype, a
                                        float32 input's terms summed in float32
router gate GEMM  h [W_x; W_y]^T        in ``c`` (weights cast to ``c``, as ``linear``)
router norm, log_softmax, top-k         float32 (statistics, running buffers and scores);
                                        the running statistics stay float32
atomic experts                          h in ``c``; the expert tables are read in their own
                                        dtype (no cast copy of the (E, H) tables) and every
                                        product and sum is float32; output in ``c``
shared MLP GEMMs, SwiGLU                in ``c`` (weights cast to ``c``, as ``linear``);
                                        the activation is computed in float32
output                                  ``c``, as an autocast Linear's output
parameter gradients                     each in its parameter's dtype (a cast weight's
                                        gradient is computed in ``c``, then cast back, as
                                        autocast's; the expert tables' in float32 sums)
======================================  =================================================

float64 inputs are left alone, as autocast leaves them (and the layer rejects them).
"""

from __future__ import annotations

import torch


def autocast_dtype(h: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on ``h``'s device, or None when autocast
    is off there (or ``h`` is float64, which autocast does not cast)."""
    dev = h.device.type
    if h.dtype == torch.float64:
        return None
    # cuda and cpu always have autocast; asking torch about them would break a
    # torch.compile(fullgraph=True) graph on torch 2.11 (an untraceable builtin).
    if dev not in ("cuda", "cpu") and not torch.amp.is_autocast_available(dev):
        return None
    if not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def castable(weight: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether a fused stage may use ``weight`` with input ``h``: the same dtype, or
    autocast is on for ``h``'s device and the stage casts the weight to ``h``'s dtype
    (``h`` having been cast to the autocast dtype by the layer)."""
    return weight.dtype == h.dtype or autocast_dtype(h) is not None
