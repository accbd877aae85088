"""The atomic-expert sum as PyTorch code writes it today, for ``bench layer`` to set beside
``omni_expert``.

Both compute, for the k experts e = idx[t, r] routed to token t with weight w[t, r],

    out[t] = sum_r act(u[e] . h[t]) * w[t, r] * v[e]

on the same inputs as ``omni_expert(h, up, down, w, idx, act)``, differentiable in h, the
two tables and w:

    gather  PEER / product-key style: the rows of both tables gathered into (T, k, H)
            tensors (``F.embedding``, i.e. ``nn.Embedding`` lookups) and two einsums over them
    bag     the up projection as in ``gather``, the down projection as
            ``F.embedding_bag(idx, down, mode="sum", per_sample_weights=act(.) * w)``, which
            never materialises the (T, k, H) rows of the down table

Math in the inputs' dtype, as such code runs under autocast-free bf16 training.

``peer_layer(layer, h)`` is a whole OmniMoE layer run token-centrically: the layer's own
router and shared MLP, its expert sum through ``peer_gather`` -- the PEER-style execution of
the same model, which ``bench layer --preset paper`` sets beside the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def _scores(h, up, idx, act):
    u = F.embedding(idx, up)                                   # (T, k, H)
    return ACTIVATIONS[act](torch.einsum("th,tkh->tk", h, u))  # (T, k)


def peer_gather(h, up, down, w, idx, act: str = "silu"):
    """(T, H) expert sum through gathered (T, k, H) rows of both tables."""
    idx = idx.long()
    z = _scores(h, up, idx, act) * w.to(h.dtype)
    return torch.einsum("tk,tkh->th", z, F.embedding(idx, down))


def peer_bag(h, up, down, w, idx, act: str = "silu"):
    """(T, H) expert sum: gathered up rows, ``F.embedding_bag`` weighted sum of down rows."""
    idx = idx.long()
    z = _scores(h, up, idx, act) * w.to(h.dtype)
    return F.embedding_bag(idx, down, mode="sum", per_sample_weights=z.to(down.dtype))


PEERS = {"peer_gather": peer_gather, "peer_bag": peer_bag}


def peer_layer(layer, h):
    """``layer(h)`` for 2-D ``h`` (an ``omni_moe.OmniMoE``) with the expert sum gathered
    token by token: the layer's routing (scores are log-probabilities, so the weights are
    their exp), its shared SwiGLU MLP and its weights; (T, k, H) rows of both tables."""
    from ..ops import swiglu_mlp

    scores, idx = layer.route(h)
    experts = peer_gather(h, layer.up_embed.weight, layer.down_embed.weight, scores.exp(), idx, layer.act)
    return swiglu_mlp(h, layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight,
                      layer.act) + experts
