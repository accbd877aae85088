"""The public upstream package's import path ``omni_moe.modules.omni_moe``: ``OmniMoE`` and
``OmniMoEConfig`` (this package's layer and config, from ``omni_moe.layers``) and
``OmniMoE_Torch``, the same layer as plain token-centric PyTorch ops (upstream's name for
its kernel-free twin of ``OmniMoE``).  docs/compatibility.md lists the paths."""

from __future__ import annotations

import torch

from ..layers.omni_moe import OmniMoE, OmniMoEConfig
from ..layers.reference import OmniMoEReference
from ..ops._checks import check_dense

__all__ = ["OmniMoE", "OmniMoEConfig", "OmniMoE_Torch"]


class OmniMoE_Torch(OmniMoEReference):
    """``OmniMoE`` computed token by token with PyTorch ops only (no custom ops, no
    Triton): the formula of ``omni_moe.layers.reference.OmniMoEReference``.

    Same config, parameter names, state_dict keys and initialisation as ``OmniMoE``, so
    either loads the other's state_dict and, in float32, gives the same outputs and
    gradients within float32 rounding.  It gathers the k chosen experts' rows of every
    token ((T, k, H) tensors: memory and time grow with T*k*H) and computes every step in
    the parameters' dtype, the router norms included (plain ``nn.BatchNorm1d`` /
    ``nn.LayerNorm``), as upstream's ``OmniMoE_Torch`` does; ``OmniMoE`` normalises the
    router logits in float32, so in bfloat16 the two may choose different experts among
    near ties.  Any float dtype (float64 too) and device.

    ``forward(hidden_states, return_routing=False)`` takes (..., hidden_size) in the
    parameters' dtype and returns the same shape (and with ``return_routing`` the
    routing as ``OmniMoE.forward`` does: (..., k) log-probability scores, here in the
    parameters' dtype and sorted descending, and int32 indices).
    Not applied: ``sparse_expert_grad`` (the tables get dense gradients) and
    synchronised router statistics (``sync_router_stats=True`` is refused; None
    normalises with this process's batch).
    """

    def __init__(self, config: OmniMoEConfig):
        if not isinstance(config, OmniMoEConfig):
            raise TypeError(f"config must be an OmniMoEConfig, got {type(config).__name__}")
        if config.sync_router_stats:
            raise ValueError("OmniMoE_Torch normalises the router logits with its own process's "
                             "batch; for sync_router_stats=True use OmniMoE")
        super().__init__(config)
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.num_experts = config.num_experts
        self.reset_expert_parameters()

    # OmniMoE's initialisation of the expert tables (the other parameters are built alike).
    reset_expert_parameters = OmniMoE.reset_expert_parameters

    def forward(self, hidden_states: torch.Tensor, return_routing: bool = False):
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
        check_dense("hidden_states", hidden_states)
        wdt = self.gate_proj.weight.dtype
        if hidden_states.dtype != wdt:
            raise TypeError(f"hidden_states has dtype {hidden_states.dtype} but OmniMoE_Torch's "
                            f"parameters are {wdt}; cast one to the other")
        H = self.hidden_size
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != H:
            raise ValueError(f"hidden_states must have shape (..., hidden_size={H}), got "
                             f"{tuple(hidden_states.shape)}")
        if not isinstance(return_routing, bool):
            raise TypeError(f"return_routing must be a bool, got {type(return_routing).__name__}")
        if not return_routing:
            return super().forward(hidden_states)
        out, (scores, indices) = super().forward(hidden_states, None, True)
        return out, (scores, indices.to(torch.int32))
