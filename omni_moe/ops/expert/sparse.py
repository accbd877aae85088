"""Sparse gradients of the atomic-expert tables: only the rows of the experts used.

With ``sparse_grad=True`` (``omni_expert(..., sparse_grad=True)``,
``OmniMoEConfig(..., sparse_expert_grad=True)``) the gradients of ``up_weights`` and
``down_weights`` are sparse COO tensors of size (E, H), in the convention of
``nn.Embedding(sparse=True)``: ``indices()`` (1, D) int64 the distinct used experts in
ascending order, ``values()`` (D, H) in the weights' dtype, one row per used expert
(coalesced: built with ``is_coalesced=True``).  The unused E - D rows are never
written, read or allocated.

Each value row is the same float32 sum, in the same order, as the dense gradient's
row: the Triton path runs ``_expert_grad_kernel`` on a compacted offset table (one
entry per used expert instead of one per expert; the kernel's sums do not depend on
which tiling or table it walks), and the PyTorch path accumulates each pair into its
expert's row with ``index_add_`` as the dense PyTorch path does.  So
``sparse.to_dense()`` equals the dense gradient bit for bit (tested).

Cost: the number of used experts D is data; sizing the (D, H) values needs it on the
host, so the backward reads one scalar from the device (a sync, after the pairs are
sorted).  That is why a sparse-gradient step cannot be captured in a CUDA graph: the
backward raises a RuntimeError when called during capture.
"""

from __future__ import annotations

import torch

from .._dispatch import use_triton
from .cpu import expert_backward_reference


def _coo(rows: torch.Tensor, values: torch.Tensor, num_experts: int) -> torch.Tensor:
    # Sorted, distinct rows by construction: flag the tensor coalesced (no sort later)
    # and skip the invariant checks.  Built with the aten constructor that
    # torch.sparse_coo_tensor ends in: the Python constructor of torch < 2.13 reads the
    # global invariant-check flag even when check_invariants is passed, and so warns
    # "Sparse invariant checks are implicitly disabled" from this backward while the
    # user never set that flag.  This op reads no flag and validates nothing.
    return torch.ops.aten._sparse_coo_tensor_with_dims_and_tensors(
        1, 1, [num_experts, values.shape[1]], rows.reshape(1, -1), values, dtype=values.dtype,
        layout=torch.sparse_coo, device=values.device, is_coalesced=True)


def _check_not_capturing(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "sparse expert gradients need the number of used experts on the host (a device "
            "sync), which CUDA-graph capture forbids; capture with dense expert gradients "
            "(sparse_expert_grad=False / sparse_grad=False)")


def expert_groups(sorted_e: torch.Tensor, num_experts: int):
    """(rows int64 (D,), offsets int32 (D + 1,)) of the used experts in ``sorted_e``.

    ``sorted_e``: the stably sorted expert keys of the pairs (``group_pairs``; keys out
    of range are clamped to -1 or E, so they sort before or after every used expert).
    Group g holds sorted positions offsets[g] .. offsets[g + 1] - 1, all of expert
    rows[g]; every valid pair lies in exactly one group.  One device sync (nonzero).
    """
    key = sorted_e
    valid = (key >= 0) & (key < num_experts)
    start = valid.clone()
    if key.numel() > 1:
        start[1:] &= key[1:] != key[:-1]
    pos = start.nonzero().reshape(-1)                          # the sync: D on the host
    # The last valid group ends where the first key >= E begins (or at P).
    end = torch.searchsorted(key, torch.full((1,), num_experts, dtype=key.dtype, device=key.device))
    offsets = torch.cat((pos, end.to(pos.dtype))).to(torch.int32)
    return key[pos].to(torch.int64), offsets


def _triton_backward(grad_out, h, up, down, w, idx, a, sorted_e, perm, act, need_dh, need_dup,
                     need_ddown, log_weights, precision):
    from .kernels import expert_backward

    return expert_backward(grad_out, h, up, down, w, idx, a, sorted_e, perm, act, need_dh,
                           need_dup, need_ddown, log_weights=log_weights, used_rows=expert_groups,
                           precision=precision)


def _torch_backward(grad_out, h, up, down, w, idx, a, act, need_dh, need_dup, need_ddown,
                    log_weights):
    """The PyTorch path's backward (``cpu.expert_backward_reference``) with the weight
    gradients accumulated into one row per used expert instead of E rows (not E rows and
    a row gather: that would allocate the (E, H) sums this avoids)."""
    T, K = idx.shape
    rows, inv = torch.unique(idx.long().reshape(-1), sorted=True, return_inverse=True)
    wx = w.float().exp() if log_weights else w
    dh, dup, ddown, dw = expert_backward_reference(grad_out, h, up, down, wx, idx, a, act,
                                                   rows=(inv.reshape(T, K), rows.numel()))
    if log_weights:  # d score = exp(score) * d weight
        dw = (dw * wx).to(w.dtype)
    return (dh if need_dh else None, dup if need_dup else None,
            ddown if need_ddown else None, dw, rows)


def sparse_backward_impl(grad_out, h, up, down, w, idx, a, sorted_e, perm, act, need_dh, need_dup,
                         need_ddown, log_weights=False, precision="exact"):
    """``op.expert_backward_impl`` with sparse COO (E, H) weight gradients.

    Returns (dh, dup, ddown, dw); a gradient not needed comes back as an empty tensor.
    """
    _check_not_capturing(h.device)
    E = up.shape[0]
    if use_triton(h):
        dh, dup, ddown, dw, rows = _triton_backward(grad_out, h, up, down, w, idx, a, sorted_e,
                                                    perm, act, need_dh, need_dup, need_ddown,
                                                    log_weights, precision)
    else:
        dh, dup, ddown, dw, rows = _torch_backward(grad_out, h, up, down, w, idx, a, act, need_dh,
                                                   need_dup, need_ddown, log_weights)
    return (dh if need_dh else h.new_empty((0,)),
            _coo(rows, dup, E) if need_dup else up.new_empty((0,)),
            _coo(rows, ddown, E) if need_ddown else down.new_empty((0,)), dw)
