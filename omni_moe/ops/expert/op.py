"""The atomic-expert op (``omni_expert``) as ``torch.library`` custom ops.

    out[t] = sum_r act(u[idx[t,r]] . h[t]) * w[t,r] * v[idx[t,r]]

u = up_weights, v = down_weights (row e: expert e's input / output vector), w =
routing_weights (= exp(router scores); ``omni_expert_from_scores`` takes the scores and
fuses the exp into the kernels).  Forward and backward are custom ops with fake
(meta) implementations and a registered autograd formula, so ``torch.compile(
fullgraph=True)`` traces through them.  In eager mode the same two implementation
functions run behind a ``torch.autograd.Function`` instead (less host time per call);
both paths give identical bits (tested).

Dispatch (``omni_moe.ops._dispatch.use_triton``): CUDA tensors, and CPU tensors under
``TRITON_INTERPRET=1``, run the Triton kernels of ``kernels.py`` (its
docstring: two schedules chosen from the shapes; one launch forward and two plus a
device sort backward in the default one); other CPU tensors run the token-centric PyTorch
path of ``cpu.py``.

Index range: indices must lie in [0, E).  Checking that on a CUDA tensor needs a device
-> host sync, which this op never does; there, out-of-range slots are masked instead
(they contribute nothing to ``out`` and get zero gradients; no memory outside the
tensors is read).  For CPU tensors (no sync to pay) the op raises ValueError.
"""

from __future__ import annotations

import torch

from .._checks import check_choice, check_dense, check_float_tensor, check_same
from .._dispatch import use_triton
from .._activations import check_activation
from .cpu import expert_backward_reference, expert_forward_reference
from .dense import PRECISIONS

_INDEX_DTYPES = (torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1


def check_expert_args(hidden_states, up_weights, down_weights, routing_weights, indices, act,
                      precision="exact"):
    """Validate user input; raise TypeError/ValueError naming the offending argument.

    Only metadata is checked here (no data reads, so it is free and traceable); the
    index range is checked inside the op (see the module docstring).
    """
    named = (("hidden_states", hidden_states), ("up_weights", up_weights),
             ("down_weights", down_weights), ("routing_weights", routing_weights),
             ("indices", indices))
    for name, t in named[:4]:
        check_float_tensor(name, t, dims=2)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    check_dense("indices", indices)
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if indices.dim() != 2:
        raise ValueError(f"indices must be 2-D, got shape {tuple(indices.shape)}")
    check_activation(act)
    check_choice("precision", precision, tuple(PRECISIONS))
    for name, t in named[1:]:
        check_same(name, t, "hidden_states", hidden_states, dtype=False, shape=False)
    T, H = hidden_states.shape
    E = up_weights.shape[0]
    if up_weights.shape[1] != H:
        raise ValueError(
            f"up_weights must have shape (E, H={H}), got {tuple(up_weights.shape)}")
    if tuple(down_weights.shape) != tuple(up_weights.shape):
        raise ValueError(
            f"down_weights has shape {tuple(down_weights.shape)} but up_weights has "
            f"{tuple(up_weights.shape)}")
    if routing_weights.shape[0] != T:
        raise ValueError(
            f"routing_weights must have shape (T={T}, k), got {tuple(routing_weights.shape)}")
    if tuple(indices.shape) != tuple(routing_weights.shape):
        raise ValueError(
            f"indices has shape {tuple(indices.shape)} but routing_weights has "
            f"{tuple(routing_weights.shape)}")
    if E > _INT32_MAX:
        raise ValueError(f"up_weights has {E} rows; at most {_INT32_MAX} experts are supported")
    if indices.numel() > _INT32_MAX:
        raise ValueError(f"indices has {indices.numel()} elements; at most {_INT32_MAX} supported")


def _check_index_range_cpu(indices: torch.Tensor, num_experts: int):
    if indices.device.type == "cpu" and indices.numel() > 0:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"indices must be in [0, {num_experts}) (num experts = up_weights.shape[0]), "
                f"got values in [{lo}, {hi}]")


def expert_forward_impl(h, up, down, w, idx, act, log_weights=False, precision="exact"):
    """(out, a, sorted_e, perm): a (T, k) float32 pre-activations; sorted_e/perm the pairs'
    grouping by expert when the kernels' "expert" schedule ran, else empty (all four
    saved for backward).  ``precision``: see ``omni_expert`` (the PyTorch path is exact)."""
    _check_index_range_cpu(idx, up.shape[0])
    if use_triton(h):
        from .kernels import expert_forward

        return expert_forward(h, up, down, w, idx, act, log_weights=log_weights,
                              precision=precision)
    if log_weights:
        w = w.float().exp()
    out, a = expert_forward_reference(h, up, down, w, idx, act)
    # The PyTorch path needs no grouping; empty placeholders keep the op's signature.
    return (out, a.contiguous(), idx.new_empty((0,), dtype=_sort_key_dtype(h, up, down, idx)),
            idx.new_empty((0,), dtype=torch.int64))


def expert_backward_impl(grad_out, h, up, down, w, idx, a, sorted_e, perm, act, need_dh,
                         need_dup, need_ddown, log_weights=False, precision="exact"):
    """(dh, dup, ddown, dw); a gradient not needed comes back as an empty (0,) tensor."""
    if use_triton(h):
        from .kernels import expert_backward

        dh, dup, ddown, dw = expert_backward(grad_out, h, up, down, w, idx, a, sorted_e, perm, act,
                                             need_dh, need_dup, need_ddown, log_weights=log_weights,
                                             precision=precision)
    else:
        wx = w.float().exp() if log_weights else w
        dh, dup, ddown, dw = expert_backward_reference(grad_out, h, up, down, wx, idx, a, act)
        if log_weights:  # d score = exp(score) * d weight
            dw = (dw * wx).to(w.dtype)
    return (dh if need_dh else h.new_empty((0,)), dup if need_dup else up.new_empty((0,)),
            ddown if need_ddown else down.new_empty((0,)), dw)


def _schedule(h, up, down, idx) -> str | None:
    """The kernels' schedule for these inputs (None: the PyTorch path)."""
    if not use_triton(h):
        return None
    from . import kernels

    T, H = h.shape
    return kernels.default_config(T, H, up.shape[0], idx.shape[1], up.element_size(),
                                  dtype=kernels.shared_dtype(h, up, down)).schedule


def _sort_key_dtype(h, up, down, idx) -> torch.dtype:
    schedule = _schedule(h, up, down, idx)
    if schedule is None:
        return torch.int32
    from .kernels import sort_key_dtype

    return sort_key_dtype(up.shape[0], schedule)


def _grouped_pairs(h, up, down, idx) -> int:
    """How many pairs the forward groups (the fake implementation's output size)."""
    return idx.numel() if _schedule(h, up, down, idx) in ("expert", "rows") else 0


# ---------------------------------------------------------------------------------------
# torch.library custom ops: what torch.compile traces (opaque to the compiler).

@torch.library.custom_op("omni_moe::expert_forward", mutates_args=())
def _expert_forward(h: torch.Tensor, up: torch.Tensor, down: torch.Tensor, w: torch.Tensor,
                    idx: torch.Tensor, act: str, log_weights: bool = False,
                    precision: str = "exact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return expert_forward_impl(h, up, down, w, idx, act, log_weights, precision)


@_expert_forward.register_fake
def _(h, up, down, w, idx, act, log_weights=False, precision="exact"):
    T, H = h.shape
    K = idx.shape[1]
    P = _grouped_pairs(h, up, down, idx)
    return (h.new_empty((T, H)), h.new_empty((T, K), dtype=torch.float32),
            h.new_empty((P,), dtype=_sort_key_dtype(h, up, down, idx)),
            h.new_empty((P,), dtype=torch.int64))


@torch.library.custom_op("omni_moe::expert_backward", mutates_args=())
def _expert_backward(grad_out: torch.Tensor, h: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                     w: torch.Tensor, idx: torch.Tensor, a: torch.Tensor, sorted_e: torch.Tensor,
                     perm: torch.Tensor, act: str, need_dh: bool, need_dup: bool, need_ddown: bool,
                     log_weights: bool = False,
                     precision: str = "exact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return expert_backward_impl(grad_out, h, up, down, w, idx, a, sorted_e, perm, act, need_dh, need_dup,
                          need_ddown, log_weights, precision)


@_expert_backward.register_fake
def _(grad_out, h, up, down, w, idx, a, sorted_e, perm, act, need_dh, need_dup, need_ddown,
      log_weights=False, precision="exact"):
    return (h.new_empty(h.shape if need_dh else (0,)),
            up.new_empty(up.shape if need_dup else (0,)),
            down.new_empty(down.shape if need_ddown else (0,)),
            w.new_empty(w.shape))


def _setup_context(ctx, inputs, output):
    h, up, down, w, idx, act, log_weights, precision = inputs
    _, a, sorted_e, perm = output
    ctx.save_for_backward(h, up, down, w, idx, a, sorted_e, perm)
    ctx.act = act
    ctx.log_weights = log_weights
    ctx.precision = precision


def _grads(ctx, grad_out, backward_fn):
    h, up, down, w, idx, a, sorted_e, perm = ctx.saved_tensors
    need_dh, need_dup, need_ddown, need_dw = ctx.needs_input_grad[:4]
    if not (need_dh or need_dup or need_ddown or need_dw):
        return None, None, None, None, None, None, None, None
    if grad_out is None:
        grad_out = torch.zeros_like(h)
    dh, dup, ddown, dw = backward_fn(grad_out, h, up, down, w, idx, a, sorted_e, perm, ctx.act,
                                     bool(need_dh), bool(need_dup), bool(need_ddown), ctx.log_weights,
                                     ctx.precision)
    return (dh if need_dh else None, dup if need_dup else None,
            ddown if need_ddown else None, dw if need_dw else None, None, None, None, None)


def _backward(ctx, grad_out, _grad_a, _grad_sorted, _grad_perm):
    return _grads(ctx, grad_out, torch.ops.omni_moe.expert_backward)


_expert_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Eager mode: the same implementation behind a plain autograd.Function.  A custom op
# call costs tens of microseconds of host time (dispatcher + Python), paid twice per
# step; in eager mode that is time the GPU idles between this op's short kernels.

class _ExpertFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, up, down, w, idx, act, log_weights, precision, sparse_grad=False):
        out, a, sorted_e, perm = expert_forward_impl(h, up, down, w, idx, act, log_weights,
                                                     precision)
        ctx.save_for_backward(h, up, down, w, idx, a, sorted_e, perm)
        ctx.act = act
        ctx.log_weights = log_weights
        ctx.precision = precision
        ctx.sparse_grad = sparse_grad
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.sparse_grad:
            from .sparse import sparse_backward_impl

            return (*_grads(ctx, grad_out, sparse_backward_impl), None)
        return (*_grads(ctx, grad_out, expert_backward_impl), None)


def _apply(hidden_states, up_weights, down_weights, routing_weights, indices, act, log_weights,
           sparse_grad=False, precision="exact"):
    check_expert_args(hidden_states, up_weights, down_weights, routing_weights, indices, act,
                      precision)
    if not isinstance(sparse_grad, bool):
        raise TypeError(f"sparse_grad must be a bool, got {type(sparse_grad).__name__}")
    if sparse_grad:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "sparse expert gradients cannot be traced by torch.compile (their size is "
                "data-dependent); use dense expert gradients (sparse_expert_grad=False / "
                "sparse_grad=False) in compiled code")
        return _ExpertFunction.apply(hidden_states, up_weights, down_weights, routing_weights,
                                     indices, act, log_weights, precision, True)
    if torch.compiler.is_compiling():
        return torch.ops.omni_moe.expert_forward(
            hidden_states, up_weights, down_weights, routing_weights, indices, act, log_weights,
            precision)[0]
    return _ExpertFunction.apply(hidden_states, up_weights, down_weights, routing_weights, indices,
                                 act, log_weights, precision)


def omni_expert(hidden_states, up_weights, down_weights, routing_weights, indices, act="silu", *,
                sparse_grad=False, precision="exact"):
    """Atomic-expert mixture: out[t] = sum_r act(u_e . h_t) * w[t, r] * v_e, e = indices[t, r].

    Args:
        hidden_states: (T, H) float32/float16/bfloat16.
        up_weights, down_weights: (E, H) float tensors (the ``up_embed`` /
            ``down_embed`` weights): row e is expert e's input vector u_e / output
            vector v_e.
        routing_weights: (T, k) float tensor (exp of the router scores).
        indices: (T, k) int32 or int64 in [0, E); duplicates allowed.
        act: "silu", "gelu" (exact erf form) or "relu".
        precision: "exact" (default): every product of a float32 coefficient (c_p,
            da_p) with a table or token row, float32 accumulation.  "bfloat16" (opt-in):
            the op may round each coefficient to bfloat16 first where that saves time --
            the "dense" schedule at large k (tensor cores take 16-bit operands; one GEMM
            per sum instead of three): each term of out, dh, du and dv then carries a
            relative error up to 2^-8, the size of the output's own bfloat16 rounding.
            routing_weights' gradient stays exact.  See docs/expert.md, "Precision".

    Returns:
        (T, H) tensor in hidden_states' dtype; float32 accumulation, one rounding.

    Differentiable in hidden_states, up_weights, down_weights (dense (E, H) gradients,
    zero rows for unused experts; with ``sparse_grad=True`` sparse COO gradients holding
    only the used experts' rows, see ``sparse.py``) and routing_weights;
    not in indices.  Any strides,
    T, k or E may be 0; the float inputs may have different dtypes.  Deterministic
    (bitwise) run to run.  On CUDA, out-of-range indices are masked rather than
    reported (reporting would need a host sync); on CPU they raise ValueError.
    """
    return _apply(hidden_states, up_weights, down_weights, routing_weights, indices, act, False,
                  sparse_grad, precision)


def omni_expert_from_scores(hidden_states, up_weights, down_weights, scores, indices, act="silu", *,
                            sparse_grad=False, precision="exact"):
    """``omni_expert(hidden_states, up_weights, down_weights, scores.exp(), indices, act)``
    with the exp fused into the kernels (no launch and no autograd node of its own).

    ``scores`` (T, k) are log routing weights (the router's log-probabilities); the
    gradient it receives is that of the scores.  Same contract as ``omni_expert``
    otherwise; used by ``omni_moe.OmniMoE``.
    """
    return _apply(hidden_states, up_weights, down_weights, scores, indices, act, True, sparse_grad,
                  precision)
