"""The layer's router stage as one autograd node (eager, Triton tensors).

    logits = h [W_x; W_y]^T -> BatchNorm / none -> log_softmax (both axes)
           -> omni_router top-k -> (scores float32, indices int32)

The whole prologue of the route runs inside one ``autograd.Function``: one autograd
node and one ``Function.apply`` per step, instead of one node per piece (the
concatenated gate weights, the GEMM, the fused norm + log_softmax, the router).  Its
GEMMs use aten's ``mm`` backward operand layouts (``dlogits.t().mm(h)`` for the stacked
weight gradient, as for a column-major second operand; ``dlogits.mm(W)`` for the
input's), so the results are bitwise those of the same pieces composed under autograd
(tested).  Launches: 1 cat + 1 GEMM + 1-3 norm + 1 router forward; 1 router + 1-3 norm +
2 GEMMs backward.

Used only where the layer's route plan (``OmniMoE.route_plan``) has a kernel mode and no
statistics group (eager, Triton tensors, plain modules, one process's batch); everything
else runs the pieces under autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import autocast_dtype


class _RouterStage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, wx, wy, n, k, mode, running, momentum, eps):
        from ..ops.router.op import router_forward_impl as router_forward
        from ..ops.router_norm.kernels import norm_log_softmax_forward

        # Under autocast h and the weights arrive in their own dtypes: one cast of each
        # (layers/precision.py); their gradients are cast back in backward.
        ctx.h_dtype = h.dtype
        c = autocast_dtype(h) or h.dtype
        h = h.to(c)
        w = torch.cat((wx, wy)).to(c)
        logits = F.linear(h, w)
        p, stats = norm_log_softmax_forward(logits, n, mode, running, momentum, eps)
        scores, indices = router_forward(p[:, :n], p[:, n:], k, "pruned", sorted=False)
        ctx.mark_non_differentiable(indices)
        ctx.n, ctx.mode, ctx.eps, ctx.w_dtype = n, mode, eps, wx.dtype
        if mode == "running" and any(ctx.needs_input_grad[:3]):
            # Copies: a training-mode call before this backward updates the running
            # statistics in place (in a kernel, which autograd's version counters miss).
            ctx.save_for_backward(h, w, logits, p, stats, indices, running[1].clone(),
                                  running[4].clone())
        else:
            ctx.save_for_backward(h, w, logits, p, stats, indices)
        return scores, indices

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dscores, _dindices):
        from ..ops.router.op import router_backward_impl as router_backward
        from ..ops.router_norm.kernels import norm_log_softmax_backward

        h, w, logits, p, stats, indices, *rv = ctx.saved_tensors
        n = ctx.n
        dpx, dpy = router_backward(dscores, indices, n)
        running = (None, rv[0], None, None, rv[1], None) if rv else None
        dlogits = norm_log_softmax_backward(dpx, dpy, p, logits, stats, n, ctx.mode, running, ctx.eps)
        need_h, need_wx, need_wy = ctx.needs_input_grad[:3]
        # The operand layouts of aten's linear backward (mm of the transposed weight).
        dh = dlogits.mm(w).to(ctx.h_dtype) if need_h else None
        dw = dlogits.t().mm(h).to(ctx.w_dtype) if (need_wx or need_wy) else None
        return (dh, dw[:n] if need_wx else None, dw[n:] if need_wy else None,
                None, None, None, None, None, None)


def router_stage(layer, h: torch.Tensor, mode: str):
    """(scores, indices) of ``layer`` (an ``OmniMoE``) for 2-D ``h`` through one autograd
    node; ``mode``: the plan's kernel mode (``layer.route_plan(h).mode``, not None)."""
    gx, gy = layer.router_gate_x.weight, layer.router_gate_y.weight
    n, k = layer.num_expert_sqrt, layer.top_k
    if mode == "none":
        return _RouterStage.apply(h, gx, gy, n, k, mode, None, 0.0, 0.0)
    nx, ny = layer.router_norm_x, layer.router_norm_y
    running = (nx.running_mean, nx.running_var, nx.num_batches_tracked,
               ny.running_mean, ny.running_var, ny.num_batches_tracked)
    return _RouterStage.apply(h, gx, gy, n, k, mode, running, nx.momentum, nx.eps)
