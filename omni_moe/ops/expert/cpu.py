"""The atomic-expert op's PyTorch path (CPU tensors without ``TRITON_INTERPRET=1``).

For tokens t, slots r and e = indices[t, r]:

    a[t, r]  = u_e . h_t                      (u = up_weights, row e: expert e's input vector)
    out[t]   = sum_r act(a[t, r]) * w[t, r] * v_e     (v = down_weights, w = routing_weights)

and its gradients (per pair, with g = v_e . do_t):

    dw[t, r] = act(a) * g        da = act'(a) * w * g
    dh_t    += da * u_e          du_e += da * h_t          dv_e += act(a) * w * do_t

``expert_forward_reference`` / ``expert_backward_reference`` gather u[idx] and v[idx]
into (T, k, H) float32 tensors, accumulate in float32 and round once to each output's
dtype.  Memory O(T*k*H); this is what the Triton kernels avoid.  The test oracle
(``expert_naive``) lives in ``reference.py``.
"""

from __future__ import annotations

import torch

from .._activations import activation, activation_and_grad


def expert_forward_reference(hidden_states, up_weights, down_weights, routing_weights, indices, act="silu"):
    """(out, a): out (T, H) in hidden_states' dtype, a (T, k) float32 pre-activations."""
    idx = indices.long()
    hf = hidden_states.float()
    u = up_weights[idx].float()                                   # (T, k, H)
    a = torch.bmm(u, hf.unsqueeze(-1)).squeeze(-1)                # (T, k)
    c = activation(a, act) * routing_weights.float()
    v = down_weights[idx].float()                                 # (T, k, H)
    out = torch.bmm(c.unsqueeze(1), v).squeeze(1)                 # (T, H)
    return out.to(hidden_states.dtype), a


def expert_backward_reference(grad_out, hidden_states, up_weights, down_weights, routing_weights,
                              indices, a, act="silu"):
    """(dh, dup, ddown, dw) given the forward's float32 pre-activations ``a``.

    dup/ddown are dense (E, H) with zero rows for unused experts; float32 sums
    (index_add_), each rounded once to its input's dtype.
    """
    T, H = hidden_states.shape
    E = up_weights.shape[0]
    idx = indices.long()
    flat = idx.reshape(-1)
    gof = grad_out.float()
    hf = hidden_states.float()
    g = torch.bmm(down_weights[idx].float(), gof.unsqueeze(-1)).squeeze(-1)   # (T, k) = v.do
    z, dz = activation_and_grad(a.float(), act)
    wf = routing_weights.float()
    dw = z * g
    da = dz * wf * g
    c = z * wf
    dh = torch.bmm(da.unsqueeze(1), up_weights[idx].float()).squeeze(1)
    dup = torch.zeros(E, H, dtype=torch.float32, device=hf.device)
    dup.index_add_(0, flat, (da.unsqueeze(-1) * hf.unsqueeze(1)).reshape(-1, H))
    ddown = torch.zeros(E, H, dtype=torch.float32, device=hf.device)
    ddown.index_add_(0, flat, (c.unsqueeze(-1) * gof.unsqueeze(1)).reshape(-1, H))
    return (dh.to(hidden_states.dtype), dup.to(up_weights.dtype),
            ddown.to(down_weights.dtype), dw.to(routing_weights.dtype))
