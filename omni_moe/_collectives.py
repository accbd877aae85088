"""Flat-tensor collectives over a ``torch.distributed`` process group, shared by the
layer's synchronised router statistics (``omni_moe.layers.router_stats``) and the
launch-side helpers (``omni_moe.distributed``).

Each moves one dense tensor per rank in one collective, stacked along a new or the
first dimension, so callers pack what they exchange into one buffer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["world_size", "all_gather_flat", "reduce_scatter_flat"]


def world_size(group) -> int:
    """The number of processes of ``group``."""
    return dist.get_world_size(group)


def all_gather_flat(t: torch.Tensor, group) -> torch.Tensor:
    """(P, *t.shape): ``t`` of every rank of ``group``, in rank order."""
    P = world_size(group)
    out = t.new_empty((P * t.shape[0], *t.shape[1:]) if t.dim() else (P,))
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, t.contiguous(), group=group)
    return out.view(P, *t.shape)


def reduce_scatter_flat(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over the ranks of ``group`` of ``t`` (P * n, ...): this rank's n rows."""
    P = world_size(group)
    out = t.new_empty((t.shape[0] // P, *t.shape[1:]))
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, t.contiguous(), group=group)
    return out
