"""The omni router op: argument checks, ``torch.library`` custom ops, autograd, and the
public ``omni_router``.

``omni_router`` (the pruned algorithm) and the full scan (``route(..., "fullscan")``,
behind ``omni_moe.triton.omni_router.triton_omni_router_func``) go through the ops
registered here, so every entry point validates its arguments the same way, has the
same backward, and is traceable by ``torch.compile(fullgraph=True)``.

Eager calls run the same implementation functions (``router_forward_impl``,
``router_backward_impl``) through a plain ``torch.autograd.Function``, or directly
when no gradient is needed: a custom-op call costs about 0.1 ms of host time, more than
the kernels at small T.  Traced code (``torch.compiler.is_compiling()``) goes through
the custom op.

Dispatch (``omni_moe.ops._dispatch``): CUDA tensors, and CPU tensors under
``TRITON_INTERPRET=1``, run the Triton kernels of the chosen algorithm
(``fullscan.py``; ``pruned.py``, which hands k past its fast path to ``large_k.py``;
``backward.py``); other CPU tensors run ``cpu.router_cpu`` (the fastest of three exact
PyTorch algorithms for the size, in O(T * (N + k)) memory).  ``sorted=False`` lets the
large-k kernel skip its final sort.  docs/router.md states the contract.
"""

from __future__ import annotations

import torch

from .._checks import check_choice, check_float_tensor, check_int, check_same
from .._dispatch import use_triton
from .backward import router_backward
from .fullscan import fullscan_router_forward
from .pruned import pruned_router_forward
from .cpu import router_backward_reference, router_cpu

ALGORITHMS = ("fullscan", "pruned")
# Flat expert indices are int32.
MAX_NUM_EXPERT_SQRT = 46340


def check_router_args(router_logits_x, router_logits_y, num_expert_sqrt, num_experts_per_token,
                      sorted=True):
    """Validate user input; raise TypeError/ValueError naming the offending argument.
    Returns (N, k) as Python ints (numpy and torch integer scalars are accepted)."""
    x, y = router_logits_x, router_logits_y
    check_float_tensor("router_logits_x", x)
    check_float_tensor("router_logits_y", y)
    for name, t in (("router_logits_x", x), ("router_logits_y", y)):
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (T, N), got {tuple(t.shape)}")
    check_same("router_logits_y", y, "router_logits_x", x)
    n = check_int("num_expert_sqrt", num_expert_sqrt, 1, MAX_NUM_EXPERT_SQRT)
    k = check_int("num_experts_per_token", num_experts_per_token)
    if x.shape[1] != n:
        raise ValueError(
            f"num_expert_sqrt={n} does not match router_logits_x.shape[1]={x.shape[1]}"
        )
    if k < 0 or k > n * n:
        raise ValueError(f"num_experts_per_token must be in [0, {n * n}] (N*N), got {k}")
    if not isinstance(sorted, bool):
        raise TypeError(f"sorted must be a bool, got {type(sorted).__name__}")
    return n, k


def _fullscan_forward(x, y, k, sorted=True):
    # The full scan's rounds produce descending order anyway.
    return fullscan_router_forward(x, y, k)


def _pruned_forward(x, y, k, sorted=True):
    return pruned_router_forward(x, y, k, sorted=sorted)


_TRITON_FORWARD = {"fullscan": _fullscan_forward, "pruned": _pruned_forward}


def router_forward_impl(x, y, k, algorithm, sorted=True):
    """(scores, indices) of checked arguments, by the Triton ``algorithm`` or the PyTorch
    path (``use_triton``); no autograd.  The fused router stage of the layer calls it
    inside its own autograd node."""
    if use_triton(x):
        return _TRITON_FORWARD[algorithm](x, y, k, sorted)
    return router_cpu(x, y, k, sorted)


def router_backward_impl(grad, indices, n):
    """(dx, dy): the scores' gradient scattered back to both logit rows; no autograd."""
    if use_triton(grad):
        return router_backward(grad, indices, n)
    return router_backward_reference(grad, indices, n)


@torch.library.custom_op("omni_moe::router_forward", mutates_args=())
def _router_forward(x: torch.Tensor, y: torch.Tensor, k: int, algorithm: str,
                    sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    return router_forward_impl(x, y, k, algorithm, sorted)


@_router_forward.register_fake
def _(x, y, k, algorithm, sorted=True):
    T = x.shape[0]
    return x.new_empty((T, k)), x.new_empty((T, k), dtype=torch.int32)


@torch.library.custom_op("omni_moe::router_backward", mutates_args=())
def _router_backward(grad: torch.Tensor, indices: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return router_backward_impl(grad, indices, n)


@_router_backward.register_fake
def _(grad, indices, n):
    T = grad.shape[0]
    return grad.new_empty((T, n)), grad.new_empty((T, n))


def _setup_context(ctx, inputs, output):
    x = inputs[0]
    ctx.save_for_backward(output[1])
    ctx.n = x.shape[1]


def _backward(ctx, grad_scores, grad_indices):
    (indices,) = ctx.saved_tensors
    dx, dy = torch.ops.omni_moe.router_backward(grad_scores, indices, ctx.n)
    return dx, dy, None, None, None


_router_forward.register_autograd(_backward, setup_context=_setup_context)


class _RouterFunction(torch.autograd.Function):
    """Eager-mode twin of the custom op: the same two implementation functions.

    A custom-op call costs about 0.1 ms of host time on the H100 machine (dispatcher,
    schema checks, Python), more than the kernel itself at T <= 16K; eager calls
    therefore skip it, and only traced code (torch.compile) goes through the op.
    """

    @staticmethod
    def forward(ctx, x, y, k, algorithm, sorted):
        scores, indices = router_forward_impl(x, y, k, algorithm, sorted)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.n = x.shape[1]
        return scores, indices

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_scores, grad_indices):
        (indices,) = ctx.saved_tensors
        dx, dy = router_backward_impl(grad_scores, indices, ctx.n)
        return dx, dy, None, None, None


def route(router_logits_x, router_logits_y, num_expert_sqrt, num_experts_per_token, algorithm,
          *, sorted=True):
    """Validate, then run the router with the given Triton algorithm (``sorted``: as in
    ``omni_router``; the full scan always sorts)."""
    check_choice("algorithm", algorithm, ALGORITHMS)
    _, k = check_router_args(router_logits_x, router_logits_y, num_expert_sqrt, num_experts_per_token,
                             sorted)
    x, y = router_logits_x, router_logits_y
    if torch.compiler.is_compiling():
        return torch.ops.omni_moe.router_forward(x, y, k, algorithm, sorted)
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return _RouterFunction.apply(x, y, k, algorithm, sorted)
    return router_forward_impl(x, y, k, algorithm, sorted)


def omni_router(router_logits_x, router_logits_y, num_expert_sqrt, num_experts_per_token, *,
                sorted=True):
    """Top-k experts of the N x N Cartesian-product grid; the fastest exact router.

    Args:
        router_logits_x, router_logits_y: (T, N) float32/float16/bfloat16 tensors on
            one device; any strides (e.g. the two column halves of one (T, 2N) tensor).
        num_expert_sqrt: N.
        num_experts_per_token: k, 0 <= k <= N*N.
        sorted: keyword-only, as ``torch.topk``'s: True (default) returns each row
            sorted descending; False may skip that sort and return the same pairs in
            the algorithm's deterministic order (for k past the fast path: grouped by
            x rank, the largest x logit's pairs first, each group descending).

    Returns:
        scores: (T, k) in the input dtype, sorted descending (with ``sorted=True``);
            scores[t, r] is float32(x[t, i]) + float32(y[t, j]) rounded, for
            indices[t, r] = i*N + j.
        indices: (T, k) int32, distinct per row.

    Differentiable in both logits (scores only).  See docs/router.md.
    """
    return route(router_logits_x, router_logits_y, num_expert_sqrt, num_experts_per_token, "pruned",
                 sorted=sorted)
