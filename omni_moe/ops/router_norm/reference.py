"""The router prologue in plain PyTorch: the semantics the kernels are tested against.

    px = log_softmax(norm(lx)),  py = log_softmax(norm(ly))    per row, float math in
                                                               the logits' dtype or wider

``norm`` per column over the batch: "none"; "batch" (training: batch mean and biased
variance, running statistics updated with the unbiased variance, as ``nn.BatchNorm1d``
without affine); "running" (eval: the running statistics).
"""

from __future__ import annotations

import torch


def router_log_probs_reference(logits, n, mode, running=None, momentum=0.1, eps=1e-5,
                               dtype=torch.float64):
    """(px, py) in ``dtype`` from the stacked logits (T, 2N).  With mode "batch" the
    ``running`` buffers (rm_x, rv_x, nbt_x, rm_y, rv_y, nbt_y) are updated in place."""
    x = logits.to(dtype)
    T = x.shape[0]
    if mode == "batch":
        mean = x.mean(0)
        var = ((x - mean) ** 2).mean(0)
        x = (x - mean) / torch.sqrt(var + eps)
        if running is not None:
            unbiased = var * T / (T - 1)
            with torch.no_grad():
                for rm, rv, nb, sl in ((running[0], running[1], running[2], slice(0, n)),
                                       (running[3], running[4], running[5], slice(n, 2 * n))):
                    rm.mul_(1 - momentum).add_((momentum * mean[sl]).to(rm.dtype))
                    rv.mul_(1 - momentum).add_((momentum * unbiased[sl]).to(rv.dtype))
                    nb.add_(1)
    elif mode == "running":
        rm = torch.cat((running[0], running[3])).to(dtype)
        rv = torch.cat((running[1], running[4])).to(dtype)
        x = (x - rm) / torch.sqrt(rv + eps)
    elif mode != "none":
        raise ValueError(f"mode must be 'none', 'batch' or 'running', got {mode!r}")
    return torch.log_softmax(x[:, :n], dim=-1), torch.log_softmax(x[:, n:], dim=-1)
