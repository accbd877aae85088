"""The dense (shared) branch of an OmniMoE layer: a gated MLP with a fused activation.

    swiglu(gate, up, act)      = act(gate) * up            one fused kernel each way
    swiglu_mlp(h, Wg, Wu, Wd)  = (act(h Wg^T) * (h Wu^T)) Wd^T

The three GEMMs run through ``torch.nn.functional.linear`` (cuBLAS on CUDA); only the
elementwise activation and its backward are ours (``kernels.py``).

``swiglu`` is a ``torch.library`` custom op with a fake implementation and an autograd
formula, so it is traceable by ``torch.compile(fullgraph=True)``; in eager mode the same
implementation runs behind a plain ``torch.autograd.Function`` (less host time per call).  Dispatch follows
``omni_moe.ops._dispatch``: CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``) run
the Triton kernels; other CPU tensors run the same float32 formula in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._activations import check_activation
from .._checks import check_dense, check_float_tensor, check_same
from .._dispatch import use_triton
from .cpu import swiglu_backward_torch, swiglu_forward_torch



def check_swiglu_args(gate, up, act) -> None:
    """Validate ``swiglu`` input; raise TypeError/ValueError naming the argument."""
    check_float_tensor("gate", gate)
    check_float_tensor("up", up)
    check_same("up", up, "gate", gate)
    check_activation(act)


# --------------------------------------------------------------------------- custom op
def _as_2d(t: torch.Tensor) -> torch.Tensor:
    # A view whenever the leading dimensions can be merged (the usual (B, S, I) case);
    # 2-D inputs keep their strides and go to the kernel as they are.
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def swiglu_forward_impl(gate, up, act):
    """act(gate) * up of checked arguments, by the kernel or the PyTorch path; no autograd."""
    if use_triton(gate):
        from .kernels import swiglu_forward

        return swiglu_forward(_as_2d(gate), _as_2d(up), act).view(gate.shape)
    return swiglu_forward_torch(gate, up, act)


def swiglu_backward_impl(grad, gate, up, act):
    """(dgate, dup) of checked arguments; no autograd."""
    if use_triton(gate):
        from .kernels import swiglu_backward

        dg, du = swiglu_backward(_as_2d(grad), _as_2d(gate), _as_2d(up), act)
        return dg.view(gate.shape), du.view(up.shape)
    return swiglu_backward_torch(grad, gate, up, act)


@torch.library.custom_op("omni_moe::swiglu_forward", mutates_args=())
def _swiglu_forward(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    return swiglu_forward_impl(gate, up, act)


@_swiglu_forward.register_fake
def _(gate, up, act):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@torch.library.custom_op("omni_moe::swiglu_backward", mutates_args=())
def _swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_backward_impl(grad, gate, up, act)


@_swiglu_backward.register_fake
def _(grad, gate, up, act):
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(up.shape, dtype=up.dtype, device=up.device))


def _setup_context(ctx, inputs, output):
    gate, up, act = inputs
    ctx.save_for_backward(gate, up)
    ctx.act = act


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    dgate, dup = torch.ops.omni_moe.swiglu_backward(grad, gate, up, ctx.act)
    return dgate, dup, None


_swiglu_forward.register_autograd(_backward, setup_context=_setup_context)


class _SwigluFunction(torch.autograd.Function):
    """Eager mode: the same two implementations behind a plain autograd.Function.  A
    custom op call costs tens of microseconds of host time (Python dispatch of the op
    and of its autograd wrapper), paid twice per training step; under torch.compile
    the custom ops above are traced instead.  Both paths give identical bits."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return swiglu_forward_impl(gate, up, act)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        dgate, dup = swiglu_backward_impl(grad, gate, up, ctx.act)
        return dgate, dup, None


# --------------------------------------------------------------------------- public API
def swiglu(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """Fused gated activation: ``act(gate) * up``.

    Args:
        gate, up: tensors of one shape (..., I), float32/float16/bfloat16, one device; any
            strides (2-D inputs are read in place, e.g. the column halves of one (M, 2I)
            projection).
        act: "silu" (SwiGLU, default), "gelu" (exact erf GELU, GeGLU) or "relu".

    Returns:
        A new contiguous tensor of gate's shape and dtype: float32 math, rounded once
        (round to nearest even).  Differentiable in ``gate`` and ``up``; the backward is
        one fused kernel that recomputes act(gate).
    """
    check_swiglu_args(gate, up, act)
    if torch.compiler.is_compiling():
        return torch.ops.omni_moe.swiglu_forward(gate, up, act)
    return _SwigluFunction.apply(gate, up, act)


def swiglu_mlp(hidden_states: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
               down_weight: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """Dense gated MLP ``down(act(gate(h)) * up(h))`` with bias-free weights.

    Args:
        hidden_states: (..., H).
        gate_weight, up_weight: (I, H) (nn.Linear layout); down_weight: (H, I).
        act: see ``swiglu``.
    Returns (..., H) in hidden_states' dtype.  GEMMs via ``F.linear`` (cuBLAS).
    """
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    check_dense("hidden_states", hidden_states)
    if hidden_states.dim() < 1:
        raise ValueError("hidden_states must have shape (..., hidden_size), got a scalar")
    H = hidden_states.shape[-1]
    for name, w in (("gate_weight", gate_weight), ("up_weight", up_weight), ("down_weight", down_weight)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
        check_dense(name, w)
        if w.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(w.shape)}")
    I = gate_weight.shape[0]
    if tuple(gate_weight.shape) != (I, H):
        raise ValueError(f"gate_weight must have shape (I, {H}), got {tuple(gate_weight.shape)}")
    if tuple(up_weight.shape) != (I, H):
        raise ValueError(f"up_weight must have shape ({I}, {H}), got {tuple(up_weight.shape)}")
    if tuple(down_weight.shape) != (H, I):
        raise ValueError(f"down_weight must have shape ({H}, {I}), got {tuple(down_weight.shape)}")
    inner = swiglu(F.linear(hidden_states, gate_weight), F.linear(hidden_states, up_weight), act)
    return F.linear(inner, down_weight)
