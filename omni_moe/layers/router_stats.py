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

The counts stay on the device (no host sync per layer call, as in ``nn.SyncBatchNorm``):
per-split counts, the global count and the running-statistics update are device
tensors, and every rank runs the same collectives whatever the counts.  So the global
count cannot pick a Python branch: where it is below 2 (one token over all ranks, or
none), device-side selects normalise with the running statistics and leave them and
their counters unchanged, and the backward is that of the running statistics (the
eval-mode gradient).  No rank raises: a rank may hold one token or none.  (One process
on one token raises ValueError as BatchNorm does; that path is not synchronised.)
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .._collectives import all_gather_flat, world_size
from .norms import RouterNorm


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
    group = layer.router_stats_group or dist.group.WORLD
    return group if world_size(group) > 1 else None


# [(weak reference to the default group, weak reference to its copy)]: c10d keeps both
# alive until destroy_process_group; a strong reference here would outlive that and tear
# the copy down at interpreter exit, after its backend (gloo aborts the process there).
_WORLD_COPY: list = []


def _stats_comm_group(group):
    """The group the statistics' collectives run on: ``group`` itself, except that the
    world group is replaced by a copy of it (same ranks, its own communicator), created
    once per default group on first use -- every rank calls the layer, so every rank
    creates it at the same point.  On the world group's communicator the small
    statistics collectives would queue behind the gradient all-reduces DDP issues during
    the backward and the parameter all-gathers FSDP2 prefetches during the forward (one
    communicator runs its collectives in issue order), and the compute stream would wait
    for those transfers; on their own communicator they overlap them."""
    world = dist.group.WORLD
    if group is not world:
        return group
    if _WORLD_COPY:
        known, copy = (ref() for ref in _WORLD_COPY[0])
        if known is world and copy is not None:
            return copy
    copy = dist.new_group(ranks=list(range(dist.get_world_size())))
    _WORLD_COPY[:] = [(weakref.ref(world), weakref.ref(copy))]
    return copy


def _combine(gathered: torch.Tensor, C: int):
    """(mean, M2, total count) of the concatenated batch from per-rank rows
    [mean (C), M2 (C), count] (P, 2C + 1), combined in rank order; the count is a
    0-d float32 device tensor."""
    w = gathered[:, -1:]
    total = w.sum()
    mean = (w * gathered[:, :C]).sum(0) / total.clamp(min=1)
    d = gathered[:, :C] - mean
    m2 = (gathered[:, C:2 * C] + w * d * d).sum(0)
    return mean, m2, total


def _update_running(running, mean, m2, total, momentum, n):
    """BatchNorm's running-statistics update with the global count ``total`` (a device
    tensor); below 2 rows the statistics and counters are kept (selected on the device,
    the count is never read on the host)."""
    rmx, rvx, nbx, rmy, rvy, nby = running
    with torch.no_grad():
        upd = total >= 2
        nbx.add_(upd.to(nbx.dtype))
        nby.add_(upd.to(nby.dtype))
        # momentum None: cumulative average, factor 1 / num_batches_tracked (inf where
        # nothing is tracked yet, and then not selected)
        f = momentum if momentum is not None else nbx.double().reciprocal().float()
        var_u = m2 / (total - 1)
        for r, v in ((rmx, mean[:n]), (rvx, var_u[:n]), (rmy, mean[n:2 * n]), (rvy, var_u[n:2 * n])):
            v = v.to(r.dtype)
            new = (r * (1.0 - f)).add_(v, alpha=f) if momentum is not None else (r * (1.0 - f)).add_(v * f)
            r.copy_(torch.where(upd, new, r))


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
        mean, m2, total = _combine(all_gather_flat(mine, group), C)
        ok = total >= 2
        # before the update: what fewer than two rows are normalised with
        run_mean = torch.cat((running[0], running[3]))
        run_rstd = torch.rsqrt(torch.cat((running[1], running[4])) + eps)
        _update_running(running, mean, m2, total, momentum, n)
        rstd = torch.where(ok, torch.rsqrt(m2 / total + eps), run_rstd)
        xhat = (x - torch.where(ok, mean, run_mean)) * rstd
        ctx.group = group
        ctx.save_for_backward(xhat, rstd, total)
        return xhat

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        xhat, rstd, total = ctx.saved_tensors
        sums = torch.cat((dy.sum(0), (dy * xhat).sum(0)))
        dist.all_reduce(sums, group=ctx.group)
        # Below 2 rows the running statistics are constants: no batch terms.
        sums = torch.where(total >= 2, sums / total.clamp(min=1), 0.0)
        C = xhat.shape[1]
        s1, s2 = sums[:C], sums[C:]
        return rstd * (dy - s1 - xhat * s2), None, None, None, None, None


def _split_counts(counts: torch.Tensor, S_max: int) -> torch.Tensor:
    """(P * S_max,) float32 row counts of every split of every rank, from the ranks' row
    counts (P,) float32, on their device: the single-process launcher's split rule
    (``split_rows``: at most S_max non-empty splits of ceil(T / min(S_max, T)) rows),
    0 for the padding splits and for empty ranks."""
    t = counts.to(torch.int64).unsqueeze(1)
    parts = t.clamp(min=1, max=S_max)
    rows = ((t + parts - 1) // parts).clamp(min=1)
    s = torch.arange(S_max, dtype=torch.int64, device=counts.device)
    return torch.minimum(rows, t - s * rows).clamp(min=0).flatten().to(torch.float32)


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
        P = world_size(group)
        cfg = rn.default_config(T, n)
        S_max = cfg.splits
        buf = torch.zeros(S_max * 2 * C + 1, dtype=torch.float32, device=dev)
        if T:
            S, rows = rn.split_rows(T, S_max)
            rn.stats_partials(logits, buf[:S * 2 * C].view(S, 2, C), rows, cfg)
        buf[-1:].fill_(float(T))   # a fill kernel; item assignment would copy from the host (a sync)
        gathered = all_gather_flat(buf, group)
        counts = gathered[:, -1]
        total = counts.sum(0, keepdim=True)
        stats = torch.empty((2, C), dtype=torch.float32, device=dev)
        # Below 2 rows in total the kernel puts the running statistics in ``stats`` and
        # keeps them: the rows are normalised as in eval mode.
        rn.stats_finalize(gathered[:, :-1].reshape(P * S_max, 2, C), stats, running, total, n, 1,
                          momentum, eps, cfg, counts=_split_counts(counts, S_max))
        out = torch.empty((T, C), dtype=torch.float32, device=dev)
        if T:
            rn.rows_forward(logits, stats, running, out, n, 1, eps, cfg)
        ctx.n, ctx.eps, ctx.group, ctx.cfg = n, eps, group, cfg
        ctx.save_for_backward(logits, out, stats, total)
        return out[:, :n], out[:, n:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dpx, dpy):
        import triton

        from ..ops.router_norm import kernels as rn

        x, p, stats, total = ctx.saved_tensors
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
            # over the concatenated batch divides by the global count.  Below 2 rows the
            # statistics are the running ones, constants: zero sums leave dX = rstd dl.
            sums.mul_(torch.where(total >= 2, T / total, 0.0))
            rn.bn_backward(dl, x, stats, sums, dx)
        return dx, None, None, None, None, None


def _fused_ok(layer, h) -> bool:
    """Whether ``sync_router_log_probs(layer, h, ...)`` runs the router-norm kernels: the
    layer's rule (``OmniMoE._fused_router_mode``) for synchronised statistics."""
    return layer._fused_router_mode(h, synced=True) is not None


def _sync_norms(layer):
    """(norm_x, norm_y, running statistics) of ``layer``; ValueError unless they can be
    synchronised."""
    nx, ny = layer.router_norm_x, layer.router_norm_y
    if not (type(nx) is RouterNorm and type(ny) is RouterNorm and nx.track_running_stats
            and ny.track_running_stats and nx.eps == ny.eps and nx.momentum == ny.momentum):
        raise ValueError("sync_router_stats needs the layer's own RouterNorm modules with "
                         "running statistics and equal eps/momentum on both axes")
    return nx, ny, (nx.running_mean, nx.running_var, nx.num_batches_tracked,
                    ny.running_mean, ny.running_var, ny.num_batches_tracked)


def sync_router_logits(layer, h: torch.Tensor, group):
    """``layer.normalized_router_logits(h)`` (lx, ly) in training with the router norms'
    batch statistics taken over all ranks of ``group``, through PyTorch ops.  Every rank
    of the group must call it, whatever its number of tokens."""
    nx, _, running = _sync_norms(layer)
    n = layer.num_expert_sqrt
    x = torch.cat((layer.router_gate_x(h).float(), layer.router_gate_y(h).float()), dim=1)
    xhat = _SyncNormTorch.apply(x, n, running, nx.momentum, nx.eps, _stats_comm_group(group))
    return xhat[:, :n], xhat[:, n:]


def sync_router_log_probs(layer, h: torch.Tensor, group, fused: bool | None = None):
    """``layer.router_log_probs(h)`` in training with the router norms' batch statistics
    taken over all ranks of ``group`` (see the module docstring).  Every rank of the
    group must call it, whatever its number of tokens.  ``fused``: run the router-norm
    kernels (the layer's route plan says whether they apply); None: ask the layer."""
    nx, _, running = _sync_norms(layer)
    if fused is None:
        fused = _fused_ok(layer, h)
    if fused:
        logits = F.linear(h, torch.cat((layer.router_gate_x.weight, layer.router_gate_y.weight)))
        return _SyncRouterLogProbs.apply(logits, layer.num_expert_sqrt, running, nx.momentum,
                                         nx.eps, _stats_comm_group(group))
    lx, ly = sync_router_logits(layer, h, group)
    return F.log_softmax(lx, dim=-1), F.log_softmax(ly, dim=-1)
