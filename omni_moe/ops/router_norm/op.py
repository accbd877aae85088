"""The router prologue op: (px, py) = log_softmax(norm(logits)) of both router axes from
the stacked logits (T, 2N), differentiable, through the kernels of ``kernels.py``.

``reference.py`` states the same math in plain PyTorch (any dtype; float64 is the tests'
oracle).  The layer (``OmniMoE.router_log_probs``) uses this op on Triton tensors in
eager mode and the plain PyTorch modules otherwise.
"""

from __future__ import annotations

import torch

from .kernels import norm_log_softmax_backward, norm_log_softmax_forward


class _RouterLogProbs(torch.autograd.Function):
    """(px, py) = the halves of ``norm_log_softmax_forward(logits)``; differentiable in
    ``logits``."""

    @staticmethod
    def forward(ctx, logits, n, mode, running, momentum, eps):
        p, stats = norm_log_softmax_forward(logits, n, mode, running, momentum, eps)
        ctx.n, ctx.mode, ctx.eps = n, mode, eps
        if mode == "running" and ctx.needs_input_grad[0]:
            # Copies: a training-mode call before this backward updates the running
            # statistics in place (in a kernel, which autograd's version counters miss).
            ctx.save_for_backward(logits, p, stats, running[1].clone(), running[4].clone())
        else:
            ctx.save_for_backward(logits, p, stats)
        return p[:, :n], p[:, n:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dpx, dpy):
        logits, p, stats, *rv = ctx.saved_tensors
        n = ctx.n
        if dpx is None:
            dpx = torch.zeros_like(p[:, :n])
        if dpy is None:
            dpy = torch.zeros_like(p[:, n:])
        running = (None, rv[0], None, None, rv[1], None) if rv else None
        dx = norm_log_softmax_backward(dpx, dpy, p, logits, stats, n, ctx.mode, running, ctx.eps)
        return dx, None, None, None, None, None


def router_log_probs(logits, n, mode, running=None, momentum=0.1, eps=1e-5):
    """(px, py) (T, N) float32 = log_softmax(norm(logits[:, :N])), log_softmax(norm(
    logits[:, N:])) for the stacked router logits (T, 2N).

    mode: "none" (no norm), "batch" (BatchNorm with the batch's statistics; updates the
    six ``running`` buffers (rm_x, rv_x, nbt_x, rm_y, rv_y, nbt_y) in place with
    ``momentum``) or "running" (BatchNorm with the running statistics).
    """
    return _RouterLogProbs.apply(logits, n, mode, running, momentum, eps)
