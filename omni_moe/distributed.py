"""OmniMoE layers on several processes: exact router statistics, DDP / FSDP2 helpers and
expert tables sharded across ranks.  See docs/distributed.md.

Router statistics (``OmniMoEConfig.sync_router_stats``).  In training the router norms
normalise with the batch's per-feature mean and variance; under data parallelism each
process sees only its share of the batch.  With synchronisation on (the default under an
initialised process group of more than one process) the statistics are those of the
concatenated batch, as ``nn.SyncBatchNorm`` computes them:

  forward   every process reduces its rows to (mean, M2) per feature and split (the
            router-norm kernels' first step, or a few PyTorch ops), one all-gather
            exchanges those partials and the row counts, and every process combines
            them in the same fixed order (Chan's formula; the finalize kernel with
            per-split counts), so all ranks hold bitwise-equal statistics and running
            statistics.  The unbiased running variance uses the global count.
  backward  the per-feature sums of dl and dl * xhat are all-reduced (one collective)
            before the BatchNorm backward, which divides by the global count.

Any per-rank batch size works, 0 included, as long as the global batch has at least two
tokens (one raises ValueError on every rank, like BatchNorm's "more than 1 value per
channel"; an empty global batch normalises with the running statistics).  Every rank
must call the layer the same number of times per step (as for any collective).

Expert tables larger than one GPU (``shard_expert_tables``): ``up_embed`` and
``down_embed`` become DTensor parameters sharded by rows (experts, ``Shard(0)``) over a
1-D device mesh whose ranks hold different tokens.  Each layer call all-gathers the
tokens, their scores and expert indices (T x (H + 2k) values), runs the unchanged expert
kernels on the local rows only (other ranks' experts get weight 0 / a masked index),
and reduce-scatters the partial outputs back to the tokens' ranks.  Exact: every
(token, expert) pair is computed once, by the rank holding the expert, with the same
float32 formula; only the final sum over ranks is a separate fp32 (or parameter dtype)
addition.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .ops._dispatch import use_triton

__all__ = ["router_stats_group", "set_router_stats_group", "sync_router_log_probs",
           "shard_expert_tables", "data_parallel", "fully_shard_model", "omni_moe_layers"]


# ----------------------------------------------------------------------------- helpers
def omni_moe_layers(module: nn.Module):
    """The OmniMoE layers in ``module`` (itself included), in module order."""
    from .modules.omni_moe import OmniMoE

    return [m for m in module.modules() if isinstance(m, OmniMoE)]


def _world(group) -> int:
    return dist.get_world_size(group)


def _all_gather_flat(t: torch.Tensor, group) -> torch.Tensor:
    """(P, *t.shape): ``t`` of every rank of ``group``, in rank order."""
    out = t.new_empty((_world(group) * t.shape[0], *t.shape[1:]) if t.dim() else (_world(group),))
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, t.contiguous(), group=group)
    return out.view(_world(group), *t.shape)


def _reduce_scatter_flat(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks of ``t`` (P * n, ...), this rank's n rows."""
    P = _world(group)
    out = t.new_empty((t.shape[0] // P, *t.shape[1:]))
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, t.contiguous(), group=group)
    return out


# ----------------------------------------------------------------------------- router statistics
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


def set_router_stats_group(module: nn.Module, group) -> None:
    """Normalise the router statistics of every OmniMoE layer in ``module`` over ``group``
    (e.g. the data-parallel dimension of a device mesh: ``mesh.get_group("dp")``) instead
    of the default world group."""
    for layer in omni_moe_layers(module):
        layer.router_stats_group = group


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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split_counts(T: int, S_max: int):
    """(S, rows per split, per-split row counts padded to S_max) of T rows."""
    if T == 0:
        return 0, 1, [0] * S_max
    rows = _cdiv(T, min(S_max, T))
    S = _cdiv(T, rows)
    return S, rows, [min(rows, T - s * rows) for s in range(S)] + [0] * (S_max - S)


class _SyncRouterLogProbs(torch.autograd.Function):
    """(px, py) from the stacked router logits (T, 2N) with synchronised batch statistics,
    through the router-norm launch steps (``omni_moe.ops.router_norm.kernels``): partial
    statistics, all-gather, finalize with per-split counts, row kernel; backward: row
    kernel, sums, all-reduce, BatchNorm backward."""

    @staticmethod
    def forward(ctx, logits, n, running, momentum, eps, group):
        from .ops.router_norm import kernels as rn

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

        from .ops.router_norm import kernels as rn

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
    from .modules.omni_moe import _plain
    from .ops.router_norm.kernels import MAX_N

    nx, ny = layer.router_norm_x, layer.router_norm_y
    gx, gy = layer.router_gate_x, layer.router_gate_y
    return (use_triton(h) and not torch.compiler.is_compiling() and layer.num_expert_sqrt <= MAX_N
            and all(_plain(m) for m in (gx, gy, nx, ny)) and gx.weight.dtype == h.dtype
            and nx.momentum is not None and nx.momentum == ny.momentum and nx.eps == ny.eps)


def sync_router_log_probs(layer, h: torch.Tensor, group):
    """``layer.router_log_probs(h)`` in training with the router norms' batch statistics
    taken over all ranks of ``group`` (see the module docstring).  Every rank of the
    group must call it, whatever its number of tokens."""
    from .modules.omni_moe import RouterNorm

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


# ----------------------------------------------------------------------------- sharded expert tables
class _GatherRows(torch.autograd.Function):
    """Rows of every rank concatenated in rank order (ranks may hold different counts);
    backward: the gradient's rows summed over ranks and scattered back."""

    @staticmethod
    def forward(ctx, t, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _gather_rows(t, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _scatter_rows(grad, ctx.sizes, ctx.group), None, None


def _gather_rows(t, sizes, group):
    """Rows of every rank (``sizes[r]`` on rank r) concatenated in rank order."""
    m = max(sizes)
    pad = t.new_zeros((m, *t.shape[1:]))
    pad[:t.shape[0]] = t
    g = _all_gather_flat(pad, group)
    return torch.cat([g[r, :s] for r, s in enumerate(sizes)])


def _scatter_rows(t, sizes, group):
    """This rank's rows of sum over ranks of ``t`` (sum(sizes), ...), padded per rank."""
    m = max(sizes)
    pad = t.new_zeros((len(sizes) * m, *t.shape[1:]))
    off = 0
    for r, s in enumerate(sizes):
        pad[r * m:r * m + s] = t[off:off + s]
        off += s
    out = _reduce_scatter_flat(pad, group)
    return out[:sizes[dist.get_rank(group)]]


class _ScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _scatter_rows(t, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad, ctx.sizes, ctx.group), None, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, scale):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ExpertShard:
    """The expert branch of one OmniMoE layer whose tables are row-sharded DTensors
    (installed by ``shard_expert_tables``; called by ``OmniMoE.forward``)."""

    def __init__(self, mesh, average_grads: bool):
        self.mesh = mesh
        self.group = mesh.get_group()
        self.average_grads = average_grads

    def __call__(self, layer, h, scores, indices):
        from .ops.expert.op import omni_expert_from_scores

        group = self.group
        P = _world(group)
        rank = dist.get_rank(group)
        up, down = layer.up_embed.weight, layer.down_embed.weight
        up_l, down_l = up.to_local(), down.to_local()
        if self.average_grads:
            # As DDP / FSDP average the replicated parameters' gradients over ranks.
            up_l, down_l = _ScaleGrad.apply(up_l, 1.0 / P), _ScaleGrad.apply(down_l, 1.0 / P)
        rows = _cdiv(layer.num_experts, P)   # Shard(0) splits like torch.chunk
        lo = rank * rows
        e_l = up_l.shape[0]
        sizes = [int(s) for s in _all_gather_flat(
            torch.tensor([h.shape[0]], dtype=torch.int64, device=h.device), group).view(-1).tolist()]
        h_all = _GatherRows.apply(h, sizes, group)
        s_all = _GatherRows.apply(scores, sizes, group)
        with torch.no_grad():
            i_all = _gather_rows(indices, sizes, group)
            local = (i_all >= lo) & (i_all < lo + e_l)
            # Another rank's expert: weight exp(-inf) = 0; on CUDA also an out-of-range
            # index, which the kernels mask (no row loads).  CPU paths check the range.
            fill = e_l if h.device.type == "cuda" else 0
            idx_l = torch.where(local, i_all - lo, fill).to(torch.int32)
        s_l = torch.where(local, s_all, float("-inf"))
        out_all = omni_expert_from_scores(h_all, up_l, down_l, s_l, idx_l, act=layer.act)
        return _ScatterRows.apply(out_all, sizes, group)


def shard_expert_tables(module: nn.Module, mesh, *, average_grads: bool = True) -> nn.Module:
    """Shard ``up_embed``/``down_embed`` of every OmniMoE layer in ``module`` by rows
    (experts) over the 1-D DeviceMesh ``mesh``: DTensor parameters with ``Shard(0)``
    (rank r holds rows [r*ceil(E/P), (r+1)*ceil(E/P))), each rank storing 1/P of the table,
    its gradient and optimizer state.

    The mesh's ranks are data-parallel: each passes its own tokens (any count) and gets
    their outputs, equal to one process running the concatenated batch.  The table
    gradients are averaged over the ranks (``average_grads``), like DDP's; train the
    other (replicated) parameters with ``data_parallel`` (DDP that skips the sharded
    tables).  The tables must hold the same values on every rank when this is called
    (seed the model identically).  The state_dict then holds DTensors
    (``torch.distributed.checkpoint`` saves and loads them; ``.full_tensor()`` gathers
    one).  Returns ``module``.
    """
    from torch.distributed.tensor import Shard, distribute_tensor

    if getattr(mesh, "ndim", 1) != 1:
        raise ValueError(f"mesh must be a 1-D DeviceMesh, got {mesh.ndim} dimensions")
    layers = omni_moe_layers(module)
    if not layers:
        raise ValueError("module contains no OmniMoE layer")
    for layer in layers:
        if getattr(layer, "expert_sharding", None) is not None:
            raise ValueError("the expert tables of this OmniMoE layer are already sharded")
        if getattr(layer.config, "sparse_expert_grad", False):
            raise ValueError("sparse_expert_grad is not supported with sharded expert tables "
                             "(the sharded tables get dense DTensor gradients); set it to False")
        for emb in (layer.up_embed, layer.down_embed):
            w = emb.weight
            emb.weight = nn.Parameter(distribute_tensor(w.detach(), mesh, [Shard(0)]),
                                      requires_grad=w.requires_grad)
        layer.expert_sharding = ExpertShard(mesh, average_grads)
    return module


def data_parallel(model: nn.Module, **ddp_kwargs) -> nn.Module:
    """``DistributedDataParallel(model, **ddp_kwargs)`` that leaves out the DTensor
    parameters (expert tables sharded by ``shard_expert_tables``), whose gradients are
    already complete on their owner rank."""
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    skip = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    if skip:
        DDP._set_params_and_buffers_to_ignore_for_model(model, skip)
    return DDP(model, **ddp_kwargs)


def fully_shard_model(model: nn.Module, mesh=None, *, param_dtype=torch.bfloat16,
                      reduce_dtype=torch.float32, reshard_after_forward: bool = True,
                      blocks=None) -> nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) on every OmniMoE layer (or on each
    module of ``blocks``) and then on ``model``, with a mixed-precision policy
    (``param_dtype`` None: no casting).  Parameters are all-gathered into plain tensors
    around each layer's forward and backward, so the layer's custom ops see plain
    tensors; the router norms' running statistics are buffers, left in float32.
    Returns ``model``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kw["mesh"] = mesh
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for m in (blocks if blocks is not None else omni_moe_layers(model)):
        if m is not model:
            fully_shard(m, **kw)
    fully_shard(model, **kw)
    return model
