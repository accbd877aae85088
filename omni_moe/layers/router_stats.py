"""Router statistics synchronised across processes: in training, the router norms' batch
mean and variance over every rank of a process group, as ``nn.SyncBatchNorm`` computes
them (docs/distributed.md; ``omni_moe.distributed`` has the launch-side helpers).

  forward   every process reduces its rows to (mean, M2) per feature and split (the
            router-norm kernels' first step, or a few PyTorch ops), one all-gather
            exchanges those partials and the row counts, and every process combines
            them in the same fixed order (Chan's formula; the finalize kernel with
            per-split counts), so all ranks hold bitwise-equal statistics and running
            statistics.  The unbiased running variance uses the global count.
  backward  the per-feature sums of dl and dl * xhat are all-reduced (one collective)
            before the BatchNorm backward, which divides by the global count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..ops._dispatch import use_triton
from .norms import RouterNorm, _plain


def _world(group) -> int:
    return dist.get_world_size(group)


def _all_gather_flat(t: torch.Tensor, group) -> torch.Tensor:
    """(P, *t.shape): ``t`` of every rank of ``group``, in rank order."""
    out = t.new_empty((_world(group) * t.shape[0], *t.shape[1:]) if t.dim() else (_world(group),))
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, t.contiguous(), group=group)
    return out.view(_world(group), *t.shape)


def router_stats_group(layer):
    """The process group whose batch the router norms of ``layer`` normalise over, or None
    (not training, no BatchNorm, synchronisation off, no group or a group of one)."""
    cfg = layer.config
    flag = cfg.sync_router_stats
    if not layer.training or cfg.router_norm != "batchnorm" or flag is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if flag:
            raise ValueError("sync_router_stats=True needs an initialised torch.distributed "
                             "process group (torch.distributed.init_process_group)")
        return None
    group = getattr(layer, "router_stats_group", None) or dist.group.WORLD
    return group if _world(group) > 1 else None


def _combine(gathered: torch.Tensor, C: int):
    """(mean, M2, total count) of the concatenated batch from per-rank rows
    [mean (C), M2 (C), count] (P, 2C + 1), combined in rank order."""
    counts = [int(c) for c in gathered[:, -1].tolist()]
    total = sum(counts)
    w = gathered[:, -1:].clone()
    mean = (w * gathered[:, :C]).sum(0) / max(total, 1)
    d = gathered[:, :C] - mean
    m2 = (gathered[:, C:2 * C] + w * d * d).sum(0)
    return mean, m2, total


def _check_total(total: int):
    if total == 1:
        raise ValueError("router BatchNorm in training needs more than one token across all "
                         "processes (got 1); call the layer in eval mode or with more tokens")


def _update_running(running, mean, m2, total, momentum, n):
    rmx, rvx, nbx, rmy, rvy, nby = running
    with torch.no_grad():
        nbx.add_(1)
        nby.add_(1)
        f = momentum if momentum is not None else 1.0 / float(nbx)
        var_u = m2 / (total - 1)
        for rm, rv, sl in ((rmx, rvx, slice(0, n)), (rmy, rvy, slice(n, 2 * n))):
            rm.mul_(1.0 - f).add_(mean[sl].to(rm.dtype), alpha=f)
            rv.mul_(1.0 - f).add_(var_u[sl].to(rv.dtype), alpha=f)


class _SyncNormTorch(torch.autograd.Function):
    """BatchNorm (no affine) of both router axes, x = [lx | ly] (T, 2N) float32, with the
    statistics of all ranks of ``group``; PyTorch ops (the CPU path)."""

    @staticmethod
    def forward(ctx, x, n, running, momentum, eps, group):
        T, C = x.shape
        if T:
            mean = x.mean(0)
            m2 = ((x - mean) ** 2).sum(0)
        else:
            mean = m2 = x.new_zeros(C)
        mine = torch.cat((mean, m2, x.new_full((1,), float(T))))
        mean, m2, total = _combine(_all_gather_flat(mine, group), C)
        _check_total(total)
        ctx.total = total
        if total == 0:
            rm = torch.cat((running[0], running[3]))
            rv = torch.cat((running[1], running[4]))
            rstd = torch.rsqrt(rv + eps)
            ctx.save_for_backward(x, rstd)
            return (x - rm) * rstd
        _update_running(running, mean, m2, total, momentum, n)
        rstd = torch.rsqrt(m2 / total + eps)
        xhat = (x - mean) * rstd
        ctx.group = group
        ctx.save_for_backward(xhat, rstd)
        return xhat

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        xhat, rstd = ctx.saved_tensors
        if ctx.total == 0:
            return dy * rstd, None, None, None, None, None
        sums = torch.cat((dy.sum(0), (dy * xhat).sum(0)))
        dist.all_reduce(sums, group=ctx.group)
        C = xhat.shape[1]
        s1, s2 = sums[:C] / ctx.total, sums[C:] / ctx.total
        return rstd * (dy - s1 - xhat * s2), None, None, None, None, None


def _split_counts(T: int, S_max: int):
    """(S, rows per split, per-split row counts padded to S_max) of T rows: the
    single-process launcher's split rule (``split_rows``)."""
    from ..ops.router_norm.kernels import split_rows

    if T == 0:
        return 0, 1, [0] * S_max
    S, rows = split_rows(T, S_max)
    return S, rows, [min(rows, T - s * rows) for s in range(S)] + [0] * (S_max - S)


class _SyncRouterLogProbs(torch.autograd.Function):
    """(px, py) from the stacked router logits (T, 2N) with synchronised batch statistics,
    through the router-norm launch steps (``omni_moe.ops.router_norm.kernels``): partial
    statistics, all-gather, finalize with per-split counts, row kernel; backward: row
    kernel, sums, all-reduce, BatchNorm backward."""

    @staticmethod
    def forward(ctx, logits, n, running, momentum, eps, group):
        from ..ops.router_norm import kernels as rn

        T, C = logits.shape
        dev = logits.device
        P = _world(group)
        cfg = rn.default_config(T, n)
        S_max = cfg.splits
        S, rows, _ = _split_counts(T, S_max)
        buf = torch.zeros(S_max * 2 * C + 1, dtype=torch.float32, device=dev)
        if T:
            rn.stats_partials(logits, buf[:S * 2 * C].view(S, 2, C), rows, cfg)
        buf[-1] = float(T)
        gathered = _all_gather_flat(buf, group)
        counts = [int(c) for c in gathered[:, -1].tolist()]      # host sync (small)
        total = sum(counts)
        _check_total(total)
        ctx.n, ctx.eps, ctx.total, ctx.group, ctx.cfg = n, eps, total, group, cfg
        out = torch.empty((T, C), dtype=torch.float32, device=dev)
        if total == 0:
            ctx.save_for_backward(logits)
            return out[:, :n], out[:, n:]
        split_counts = torch.tensor([c for t in counts for c in _split_counts(t, S_max)[2]],
                                    dtype=torch.float32).to(dev, non_blocking=True)
        stats = torch.empty((2, C), dtype=torch.float32, device=dev)
        rn.stats_finalize(gathered[:, :-1].reshape(P * S_max, 2, C), stats, running, total, n, 1,
                          momentum, eps, cfg, counts=split_counts)
        if T:
            rn.rows_forward(logits, stats, running, out, n, 1, eps, cfg)
        ctx.save_for_backward(logits, out, stats)
        return out[:, :n], out[:, n:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dpx, dpy):
        import triton

        from ..ops.router_norm import kernels as rn

        if ctx.total == 0:
            (logits,) = ctx.saved_tensors
            return torch.zeros_like(logits), None, None, None, None, None
        x, p, stats = ctx.saved_tensors
        n, cfg = ctx.n, ctx.cfg
        T, C = x.shape
        dev = x.device
        if dpx is None:
            dpx = torch.zeros_like(p[:, :n])
        if dpy is None:
            dpy = torch.zeros_like(p[:, n:])
        dx = torch.empty((T, C), dtype=x.dtype, device=dev)
        sums = torch.zeros((2, C), dtype=torch.float32, device=dev)
        if T:
            dl = torch.empty((T, C), dtype=torch.float32, device=dev)
            part = torch.empty((triton.cdiv(T, cfg.row_block), 2, C), dtype=torch.float32, device=dev)
            rn.rows_backward(dpx, dpy, p, x, stats, None, dx, dl, part, n, 1, ctx.eps, cfg)
            rn.sums_finalize(part, sums, cfg)
        dist.all_reduce(sums, group=ctx.group)
        if T:
            # The BatchNorm backward kernel divides the sums by its row count T; the mean
            # over the concatenated batch divides by the global count.
            sums.mul_(T / ctx.total)
            rn.bn_backward(dl, x, stats, sums, dx)
        return dx, None, None, None, None, None


def _fused_ok(layer, h) -> bool:
    from ..ops.router_norm.kernels import MAX_N

    nx, ny = layer.router_norm_x, layer.router_norm_y
    gx, gy = layer.router_gate_x, layer.router_gate_y
    return (use_triton(h) and not torch.compiler.is_compiling() and layer.num_expert_sqrt <= MAX_N
            and all(_plain(m) for m in (gx, gy, nx, ny)) and gx.weight.dtype == h.dtype
            and nx.momentum is not None and nx.momentum == ny.momentum and nx.eps == ny.eps)


def sync_router_log_probs(layer, h: torch.Tensor, group):
    """``layer.router_log_probs(h)`` in training with the router norms' batch statistics
    taken over all ranks of ``group`` (see the module docstring).  Every rank of the
    group must call it, whatever its number of tokens."""
    nx, ny = layer.router_norm_x, layer.router_norm_y
    if not (type(nx) is RouterNorm and type(ny) is RouterNorm and nx.track_running_stats
            and ny.track_running_stats and nx.eps == ny.eps and nx.momentum == ny.momentum):
        raise ValueError("sync_router_stats needs the layer's own RouterNorm modules with "
                         "running statistics and equal eps/momentum on both axes")
    n = layer.num_expert_sqrt
    running = (nx.running_mean, nx.running_var, nx.num_batches_tracked,
               ny.running_mean, ny.running_var, ny.num_batches_tracked)
    if _fused_ok(layer, h):
        logits = F.linear(h, torch.cat((layer.router_gate_x.weight, layer.router_gate_y.weight)))
        return _SyncRouterLogProbs.apply(logits, n, running, nx.momentum, nx.eps, group)
    x = torch.cat((layer.router_gate_x(h).float(), layer.router_gate_y(h).float()), dim=1)
    xhat = _SyncNormTorch.apply(x, n, running, nx.momentum, nx.eps, group)
    return F.log_softmax(xhat[:, :n], dim=-1), F.log_softmax(xhat[:, n:], dim=-1)
