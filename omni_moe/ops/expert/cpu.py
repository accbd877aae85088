"""The atomic-expert op's PyTorch path (CPU tensors without ``TRITON_INTERPRET=1``).

For tokens t, slots r and e = indices[t, r]:

    a[t, r]  = u_e . h_t                      (u = up_weights, row e: expert e's input vector)
    out[t]   = sum_r act(a[t, r]) * w[t, r] * v_e     (v = down_weights, w = routing_weights)

and its gradients (per pair, with g = v_e . do_t):

    dw[t, r] = act(a) * g        da = act'(a) * w * g
    dh_t    += da * u_e          du_e += da * h_t          dv_e += act(a) * w * do_t

``expert_forward_reference`` / ``expert_backward_reference`` gather u[idx] and v[idx]
into (tokens, k, H) float32 tensors, accumulate in float32 and round once to each output's
dtype.  They do so for a chunk of tokens at a time (``token_chunks``: about 256 MiB of
such temporaries), so memory is O(T*k) plus the chunk, not O(T*k*H) -- at T = 4096,
k = 4096, H = 1024 one whole gather would be 64 GiB.  The Triton kernels gather nothing.
The test oracle (``expert_naive``) lives in ``reference.py``.
"""

from __future__ import annotations

import torch

from .._activations import activation, activation_and_grad
from .._dispatch import autocast_off


# Bytes of (tokens, k, H) float32 temporaries per chunk of tokens.
_CHUNK_BYTES = 256 * 2**20


def token_chunks(T: int, K: int, H: int) -> list[slice]:
    """Slices of the T tokens such that two (chunk, K, H) float32 tensors (the most the
    loops below hold at once) fit in about 256 MiB (one token at least); [slice(0, 0)]
    when T = 0."""
    step = max(1, _CHUNK_BYTES // max(1, 2 * K * H * 4))
    return [slice(t0, min(T, t0 + step)) for t0 in range(0, T, step)] or [slice(0, 0)]


def expert_forward_reference(hidden_states, up_weights, down_weights, routing_weights, indices, act="silu"):
    """(out, a): out (T, H) in hidden_states' dtype, a (T, k) float32 pre-activations."""
    T, H = hidden_states.shape
    K = indices.shape[1]
    idx = indices.long()
    dev = hidden_states.device
    out = torch.empty((T, H), dtype=torch.float32, device=dev)
    a = torch.empty((T, K), dtype=torch.float32, device=dev)
    with autocast_off(hidden_states):      # float32 bmm under the caller's autocast too
        for sl in token_chunks(T, K, H):
            ix = idx[sl]
            u = up_weights[ix].float()                                # (chunk, k, H)
            a[sl] = torch.bmm(u, hidden_states[sl].float().unsqueeze(-1)).squeeze(-1)
            del u
            c = activation(a[sl], act) * routing_weights[sl].float()
            v = down_weights[ix].float()                              # (chunk, k, H)
            out[sl] = torch.bmm(c.unsqueeze(1), v).squeeze(1)
    return out.to(hidden_states.dtype), a


def expert_backward_reference(grad_out, hidden_states, up_weights, down_weights, routing_weights,
                              indices, a, act="silu", rows=None):
    """(dh, dup, ddown, dw) given the forward's float32 pre-activations ``a``.

    dup/ddown are dense (E, H) with zero rows for unused experts; float32 sums
    (index_add_, chunk after chunk: the pairs in token order), each rounded once to its
    input's dtype.  ``rows`` = (row (T, k) int64, D): accumulate pair (t, r) into row
    row[t, r] of (D, H) sums instead (the sparse gradients' used rows).
    """
    T, H = hidden_states.shape
    K = indices.shape[1]
    idx = indices.long()
    row_of, D = (idx, up_weights.shape[0]) if rows is None else rows
    dev = hidden_states.device
    dh = torch.empty((T, H), dtype=torch.float32, device=dev)
    dw = torch.empty((T, K), dtype=torch.float32, device=dev)
    dup = torch.zeros(D, H, dtype=torch.float32, device=dev)
    ddown = torch.zeros(D, H, dtype=torch.float32, device=dev)
    with autocast_off(hidden_states):
        for sl in token_chunks(T, K, H):
            ix = idx[sl]
            flat = row_of[sl].reshape(-1)
            gof = grad_out[sl].float()
            hf = hidden_states[sl].float()
            g = torch.bmm(down_weights[ix].float(), gof.unsqueeze(-1)).squeeze(-1)   # v . do
            z, dz = activation_and_grad(a[sl].float(), act)
            wf = routing_weights[sl].float()
            dw[sl] = z * g
            da = dz * wf * g
            dh[sl] = torch.bmm(da.unsqueeze(1), up_weights[ix].float()).squeeze(1)
            dup.index_add_(0, flat, (da.unsqueeze(-1) * hf.unsqueeze(1)).reshape(-1, H))
            ddown.index_add_(0, flat, ((z * wf).unsqueeze(-1) * gof.unsqueeze(1)).reshape(-1, H))
    return (dh.to(hidden_states.dtype), dup.to(up_weights.dtype),
            ddown.to(down_weights.dtype), dw.to(routing_weights.dtype))
