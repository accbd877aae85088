"""The router's prologue: BatchNorm (batch or running statistics) or none, then
log-softmax, of both router axes: ``op`` (autograd), ``kernels`` (Triton kernels, launch
steps and rule), ``reference`` (the PyTorch semantics)."""

from .op import router_log_probs

__all__ = ["router_log_probs"]
