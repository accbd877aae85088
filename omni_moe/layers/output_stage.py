"""The layer's output stage as one autograd node (eager mode).

    out = addmm(experts(h, u, v, exp(scores), idx), act(h W_g^T) * (h W_u^T), W_d^T)

The expert op, both MLP projections, the SwiGLU activation and the down projection run
inside one ``autograd.Function``: one autograd node and one ``Function.apply`` instead of
eight nodes (the expert Function, two ``F.linear`` (Mm + T each), the SwiGLU Function,
``addmm`` and its weight's T) and two applies.  Every kernel and GEMM uses the operand
layouts of aten's ``mm`` backward (``g.t().mm(x)`` for the weight W of ``x W^T``, whose
transposed view is column-major; ``g.mm(W)`` for the input), so each gradient is bitwise
what the same pieces composed under autograd give, except the input gradient: its three
terms (experts, gate, up) are summed in a fixed order, the MLP terms in the GEMMs'
epilogues (``addmm_``, one rounding fewer), where autograd would add them with two
elementwise adds in its own order (within rounding; the layer tests' float64 bounds
hold for both).

Used by ``OmniMoE.forward`` outside ``torch.compile`` when the MLP modules are plain
(no hooks) and every weight has h's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import autocast_dtype


class _OutputStage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, up, down, scores, idx, wg, wu, wd, act, sparse_grad, precision):
        from ..ops.expert.op import expert_forward_impl as expert_forward
        from ..ops.swiglu.op import swiglu_forward_impl as swiglu_forward

        # Under autocast h and the MLP weights arrive in their own dtypes and are cast to
        # the autocast dtype here (layers/precision.py); the expert tables are read as
        # they are.
        ctx.w_dtype, ctx.h_dtype = wg.dtype, h.dtype
        c = autocast_dtype(h) or h.dtype
        h = h.to(c)
        wg, wu, wd = wg.to(c), wu.to(c), wd.to(c)
        experts, a, sorted_e, perm = expert_forward(h, up, down, scores, idx, act, True, precision)
        gate = F.linear(h, wg)
        upp = F.linear(h, wu)
        inner = swiglu_forward(gate, upp, act)
        out = torch.addmm(experts, inner, wd.t())
        ctx.save_for_backward(h, up, down, scores, idx, a, sorted_e, perm, wg, wu, wd, gate, upp,
                              inner)
        ctx.act, ctx.sparse_grad, ctx.precision = act, sparse_grad, precision
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        from ..ops.expert.op import expert_backward_impl as expert_backward
        from ..ops.swiglu.op import swiglu_backward_impl as swiglu_backward

        h, up, down, scores, idx, a, sorted_e, perm, wg, wu, wd, gate, upp, inner = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_h, need_up, need_down, need_s = need[:4]
        need_wg, need_wu, need_wd = need[5:8]
        act = ctx.act
        dh = dup = ddown = ds = dwg = dwu = dwd = None
        if need_h or need_up or need_down or need_s:
            if ctx.sparse_grad:
                from ..ops.expert.sparse import sparse_backward_impl as fn
            else:
                fn = expert_backward
            dh, dup, ddown, ds = fn(dout, h, up, down, scores, idx, a, sorted_e, perm, act,
                                    bool(need_h), bool(need_up), bool(need_down), True,
                                    ctx.precision)
        wdt = ctx.w_dtype
        if need_wd:
            dwd = dout.t().mm(inner).to(wdt)
        if need_h or need_wg or need_wu:
            dgate, dupp = swiglu_backward(dout.mm(wd), gate, upp, act)
            if need_wg:
                dwg = dgate.t().mm(h).to(wdt)
            if need_wu:
                dwu = dupp.t().mm(h).to(wdt)
            if need_h and ctx.h_dtype != h.dtype:
                # A float32 input under autocast: its three gradient terms, each rounded
                # to the autocast dtype by its kernel or GEMM, summed in float32 (as
                # autograd sums the terms of an input that autocast cast per op).
                dh = dh.to(ctx.h_dtype).add_(dgate.mm(wg)).add_(dupp.mm(wu))
            elif need_h:
                # The input gradient's MLP terms added in the GEMMs' epilogues (beta = 1),
                # in place on the experts' fresh dh: no elementwise add launches.
                dh = dh.addmm_(dgate, wg).addmm_(dupp, wu)
        return (dh if need_h else None, dup if need_up else None, ddown if need_down else None,
                ds if need_s else None, None, dwg, dwu, dwd, None, None, None)


def output_stage(layer, h, scores, indices):
    """``layer``'s experts + shared MLP for 2-D ``h`` through one autograd node, or None
    when the unfused path must run (compiling, hooks, MLP weights of another dtype
    outside autocast).  The expert tables may have any dtype (the kernels read them as
    they are)."""
    from ..ops.expert.op import check_expert_args
    from .norms import is_plain
    from .precision import castable

    mods = (layer.gate_proj, layer.up_proj, layer.down_proj)
    if torch.compiler.is_compiling() or not all(is_plain(m) for m in mods):
        return None
    ws = (layer.up_embed.weight, layer.down_embed.weight) + tuple(m.weight for m in mods)
    if not all(castable(w, h) and w.dtype == ws[2].dtype for w in ws[2:]):
        return None
    precision = layer.config.expert_precision
    check_expert_args(h, ws[0], ws[1], scores, indices, layer.act, precision)
    return _OutputStage.apply(h, ws[0], ws[1], scores, indices, ws[2], ws[3], ws[4], layer.act,
                              bool(layer.up_embed.sparse), precision)
