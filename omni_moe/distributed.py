"""OmniMoE layers on several processes: exact router statistics, DDP / FSDP2 helpers and
expert tables sharded across ranks.  See docs/distributed.md.

Router statistics (``OmniMoEConfig.sync_router_stats``).  In training the router norms
normalise with the batch's per-feature mean and variance; under data parallelism each
process sees only its share of the batch.  With synchronisation on (the default under an
initialised process group of more than one process) the statistics are those of the
concatenated batch, as ``nn.SyncBatchNorm`` computes them (``omni_moe.layers.router_stats``
says how).

Any per-rank batch size works, 0 and 1 included.  The token counts stay on the device
(no host sync per layer call), so a global batch of fewer than two tokens cannot raise:
it is normalised with the running statistics, which it leaves unchanged (with their
counters), and gets the eval-mode gradient; one process with one token still raises
ValueError, as BatchNorm does.  Every rank must call the layer, and run its backward,
the same number of times per step (as for any collective).

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

from ._collectives import all_gather_flat, reduce_scatter_flat, world_size
from .layers.router_stats import router_stats_group, sync_router_log_probs

__all__ = ["router_stats_group", "set_router_stats_group", "sync_router_log_probs",
           "shard_expert_tables", "data_parallel", "fully_shard_model", "omni_moe_layers"]


# ----------------------------------------------------------------------------- helpers
def omni_moe_layers(module: nn.Module):
    """The OmniMoE layers in ``module`` (itself included), in module order."""
    from .layers.omni_moe import OmniMoE

    return [m for m in module.modules() if isinstance(m, OmniMoE)]


# ----------------------------------------------------------------------------- router statistics
def set_router_stats_group(module: nn.Module, group) -> None:
    """Normalise the router statistics of every OmniMoE layer in ``module`` over ``group``
    (e.g. the data-parallel dimension of a device mesh: ``mesh.get_group("dp")``) instead
    of the default world group."""
    for layer in omni_moe_layers(module):
        layer.router_stats_group = group


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
    g = all_gather_flat(pad, group)
    return torch.cat([g[r, :s] for r, s in enumerate(sizes)])


def _scatter_rows(t, sizes, group):
    """This rank's rows of sum over ranks of ``t`` (sum(sizes), ...), padded per rank."""
    m = max(sizes)
    pad = t.new_zeros((len(sizes) * m, *t.shape[1:]))
    off = 0
    for r, s in enumerate(sizes):
        pad[r * m:r * m + s] = t[off:off + s]
        off += s
    out = reduce_scatter_flat(pad, group)
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
        P = world_size(group)
        rank = dist.get_rank(group)
        up, down = layer.up_embed.weight, layer.down_embed.weight
        up_l, down_l = up.to_local(), down.to_local()
        if self.average_grads:
            # As DDP / FSDP average the replicated parameters' gradients over ranks.
            up_l, down_l = _ScaleGrad.apply(up_l, 1.0 / P), _ScaleGrad.apply(down_l, 1.0 / P)
        rows = -(-layer.num_experts // P)   # Shard(0) splits like torch.chunk
        lo = rank * rows
        e_l = up_l.shape[0]
        sizes = [int(s) for s in all_gather_flat(
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
        out_all = omni_expert_from_scores(h_all, up_l, down_l, s_l, idx_l, act=layer.act,
                                          precision=layer.config.expert_precision)
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
    one).  Give an optimizer the sharded tables in a group of their own
    (``omni_moe.param_groups``): a multi-tensor (foreach) step, torch's default on CUDA,
    cannot mix DTensor and plain parameters in one group.  Returns ``module``.
    """
    from torch.distributed.tensor import Shard, distribute_tensor

    if getattr(mesh, "ndim", 1) != 1:
        raise ValueError(f"mesh must be a 1-D DeviceMesh, got {mesh.ndim} dimensions")
    layers = omni_moe_layers(module)
    if not layers:
        raise ValueError("module contains no OmniMoE layer")
    for layer in layers:
        if layer.expert_sharding is not None:
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
    already complete on their owner rank.

    ``gradient_as_bucket_view`` defaults to True here: the gradients live in DDP's
    all-reduce buckets instead of being copied into them and back, which saves one copy
    of every gradient in memory and two device copies per step -- noticeable for expert
    tables of hundreds of millions of parameters (``docs/benchmarks.md``).  Pass False
    to get DDP's own default."""
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    skip = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    if skip:
        DDP._set_params_and_buffers_to_ignore_for_model(model, skip)
    ddp_kwargs.setdefault("gradient_as_bucket_view", True)
    return DDP(model, **ddp_kwargs)


def fully_shard_model(model: nn.Module, mesh=None, *, param_dtype=torch.bfloat16,
                      reduce_dtype=torch.float32, reshard_after_forward: bool = True,
                      blocks=None) -> nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) on every OmniMoE layer (or on each
    module of ``blocks``) and then on ``model``, with a mixed-precision policy
    (``param_dtype`` None: no casting).  ``mesh`` None: all processes, on the
    parameters' device type (a CPU model stays on CPU).  Parameters are all-gathered into
    plain tensors around each layer's forward and backward, so the layer's custom ops see
    plain tensors; the router norms' running statistics are buffers, left in float32.

    ``reshard_after_forward`` applies to every sharded module but the last (the last of
    ``blocks``, or the last OmniMoE layer in module order), which keeps its gathered
    parameters from its forward to its backward whatever the flag: its backward is the
    first to run, right after the forward, so freeing them would only make FSDP2 gather
    them again at once (the usual FSDP2 practice; FSDP2 treats the root ``model`` so by
    itself).  Returns ``model``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"reshard_after_forward": reshard_after_forward}
    if mesh is None:
        # fully_shard's own default mesh is on CUDA whenever CUDA exists, which would move
        # a CPU (gloo) model to the GPUs: follow the parameters' device instead.
        p = next(model.parameters(), None)
        if p is not None and p.device.type == "cpu":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if mesh is not None:
        kw["mesh"] = mesh
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    mods = [m for m in (blocks if blocks is not None else omni_moe_layers(model)) if m is not model]
    for i, m in enumerate(mods):
        fully_shard(m, **(kw if i < len(mods) - 1 else dict(kw, reshard_after_forward=False)))
    fully_shard(model, **kw)
    return model
