"""The OmniMoE layer (arXiv 2602.05711): a shared dense SwiGLU MLP plus k atomic experts
per token, chosen by the Cartesian-product omni router out of E = N^2.

Per token h (see docs/layer.md):

    lx = norm(W_x h),  ly = norm(W_y h)                 W_x, W_y: (N, H); norm: BatchNorm1d
    px = log_softmax(lx), py = log_softmax(ly)          float32
    scores, idx = omni_router(px, py, N, k)             top-k of px[i] + py[j] over N x N
    w = exp(scores)                                     = p_x(i) p_y(j)
    experts = omni_expert(h, up_embed, down_embed, w, idx, act)
            = sum_r act(u[idx_r] . h) * w_r * v[idx_r]
    mlp = down_proj(act(gate_proj h) * up_proj h)       cuBLAS GEMMs + fused activation
    out = mlp + experts

Launches of one eager training step on CUDA (docs/layer.md): the two gate projections
are one GEMM (stacked weights); BatchNorm + log_softmax of both axes are 3 Triton
launches (``omni_moe.ops.router_norm.kernels``); exp(scores) is fused into the expert
kernels; the shared MLP's last GEMM adds the experts' output in its epilogue (addmm).

Parameter names follow the public reference module (flash-algo/omni-moe ``OmniMoE``):
``gate_proj``, ``up_proj``, ``down_proj``, ``router_gate_x``, ``router_gate_y``,
``router_norm_x``, ``router_norm_y``, ``up_embed``, ``down_embed``, so its state_dict
loads unchanged.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, InitVar, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._checks import check_choice, check_int, check_layer_input, check_num_experts
from ..ops._dispatch import use_triton
from ..ops.expert.dense import PRECISIONS as EXPERT_PRECISIONS
from ..ops.expert.op import omni_expert_from_scores
from ..ops._activations import ACTIVATIONS
from ..ops.swiglu.op import swiglu
from ..ops.router.op import MAX_NUM_EXPERT_SQRT, omni_router
from ..ops.router_norm.op import router_log_probs as fused_router_log_probs
from .norms import RouterLayerNorm, RouterNorm, check_expert_tables, is_plain
from .output_stage import output_stage
from .precision import autocast_dtype, castable
from .router_stage import router_stage
from .router_stats import router_stats_group, sync_router_log_probs, sync_router_logits

ROUTER_NORMS = ("batchnorm", "layernorm", "none")


class RoutePlan(NamedTuple):
    """How one call routes its tokens, decided once per call by ``OmniMoE.route_plan``
    and passed down to every step of the route.

    Attributes:
        mode: the router-norm kernels' mode, "none" / "batch" / "running"
            (``omni_moe.ops.router_norm``), or None: PyTorch ops (the plain path).
        group: the process group the router norms' batch statistics are synchronised
            over (``omni_moe.layers.router_stats``), or None: this process's batch.

    ``mode`` not None with ``group`` None is the single-node router stage
    (``layers/router_stage.py``); with a group the kernels run in "batch" mode with
    statistics exchanged between ranks."""

    mode: str | None
    group: object | None


@dataclass
class OmniMoEConfig:
    """Sizes and choices of one OmniMoE layer; validated on construction.

    Field order matches the public reference's ``OmniMoEConfig(hidden_size,
    intermediate_size, hidden_act, num_experts, num_experts_per_token)``, so positional
    calls written for it work here.

    Attributes:
        hidden_size: H, the model width (>= 1).
        intermediate_size: I, width of the shared dense MLP (>= 1).
        hidden_act: "silu" (default), "gelu" (exact erf GELU) or "relu"; used by both
            the shared MLP and the atomic experts.
        num_experts: E, the rows of the expert tables; the router's grid is N x N with
            N = isqrt(E), 1 <= N <= 46340.  Required.  A perfect square N^2 for a new
            model; any other count is accepted as the public upstream module runs it
            (checkpoints it wrote load), with an ``UnroutedExpertsWarning``: rows N^2..E-1
            are never routed.
        num_experts_per_token: k, 1 <= k <= N^2.  Required.  Also accepted as the keyword
            ``num_experts_per_tok`` (transformers' MoE configs' name; read back as the
            property of that name); both given and different is a ValueError.
        router_norm: "batchnorm" (BatchNorm1d without affine on each router axis, as the
            paper and the public reference), "layernorm" (per-token LayerNorm without
            affine over each axis's N logits: no statistics shared across tokens, so
            causal in training) or "none".
        sync_router_stats: in training, compute the router norms' batch statistics over
            all processes of the process group, as ``nn.SyncBatchNorm`` does (the same
            routing, gradients and running statistics as one process on the
            concatenated batch).  None (default): on when ``torch.distributed`` is
            initialised with more than one process; True: required (raises without a
            process group); False: each process normalises with its own batch.  See
            docs/distributed.md and ``omni_moe.distributed``.
        sparse_expert_grad: False (default): dense (E, H) gradients of ``up_embed`` and
            ``down_embed``.  True: sparse COO gradients holding only the used experts'
            rows (``nn.Embedding(sparse=True)``'s convention; for SparseAdam, SGD,
            Adagrad; one device sync per backward; not CUDA-graph capturable or
            compilable).  See docs/layer.md, "Sparse expert gradients".
        expert_precision: "exact" (default) or "bfloat16": the atomic experts'
            coefficients may be rounded to bfloat16 before their products with the
            tables where that saves time (the expert op's "dense" schedule, at k >=
            E/32; each term of the experts' output then carries a relative error up to
            2^-9).  ``omni_moe.ops.omni_expert``'s ``precision``; docs/expert.md,
            "Precision".

    Integer fields accept numpy and torch integer scalars and store Python ints (the
    config then serialises to JSON and compares equal to one built from ints).

    The alias is an ``InitVar`` (keyword-only, after every field), not a field: positional
    calls, ``dataclasses.asdict``/``fields``, ``==`` and ``repr`` see only the canonical
    ``num_experts_per_token``, so a config reads and compares the same whichever name
    built it.  ``dataclasses.replace`` reads every init argument back off the instance,
    the alias included, so what the alias reads back is marked (``_ReadBack``, an int)
    and yields to a canonical value passed beside it: ``replace(cfg,
    num_experts_per_token=k)`` works; ``replace`` under the alias name conflicts with the
    canonical field it copies (ValueError).
    """

    hidden_size: int
    intermediate_size: int
    hidden_act: str = "silu"
    num_experts: int | None = None
    num_experts_per_token: int | None = None
    router_norm: str = "batchnorm"
    sync_router_stats: bool | None = None
    sparse_expert_grad: bool = False
    expert_precision: str = "exact"
    _: KW_ONLY
    num_experts_per_tok: InitVar[int | None] = None

    def __post_init__(self, num_experts_per_tok):
        # Set by ``typed`` only: the callers' names of the fields, and where the warning
        # points (3: the line that called the constructor).
        names = self.__dict__.pop("_names", {})
        stacklevel = self.__dict__.pop("_stacklevel", 3)
        e_name, k_name, alias_name = (names.get(f, f) for f in (
            "num_experts", "num_experts_per_token", "num_experts_per_tok"))
        self.hidden_size = check_int(names.get("hidden_size", "hidden_size"), self.hidden_size, 1)
        self.intermediate_size = check_int(names.get("intermediate_size", "intermediate_size"),
                                           self.intermediate_size, 1)
        check_choice(names.get("hidden_act", "hidden_act"), self.hidden_act, ACTIVATIONS)
        if self.num_experts is None:
            raise TypeError(f"{e_name} is required (a perfect square N*N)")
        self.num_experts, n = check_num_experts(e_name, self.num_experts,
                                                MAX_NUM_EXPERT_SQRT, stacklevel=stacklevel)
        k = self.num_experts_per_token
        if k is not None:
            k = check_int(k_name, k, 1, n * n)
        if isinstance(num_experts_per_tok, _ReadBack) and k is not None:
            num_experts_per_tok = None      # dataclasses.replace's copy of the old k
        if num_experts_per_tok is not None:
            alias = check_int(alias_name, num_experts_per_tok, 1, n * n)
            if k is not None and k != alias:
                raise ValueError(
                    f"{alias_name}={alias} and {k_name}={k} name the same "
                    f"setting (k, experts per token); pass one")
            k = alias
        if k is None:
            raise TypeError(f"{k_name} (or {alias_name}) is required")
        self.num_experts_per_token = k
        check_choice(names.get("router_norm", "router_norm"), self.router_norm, ROUTER_NORMS)
        if self.sync_router_stats is not None and not isinstance(self.sync_router_stats, bool):
            raise TypeError(f"sync_router_stats must be a bool or None, got {type(self.sync_router_stats).__name__}")
        if not isinstance(self.sparse_expert_grad, bool):
            raise TypeError(f"sparse_expert_grad must be a bool, got {type(self.sparse_expert_grad).__name__}")
        check_choice(names.get("expert_precision", "expert_precision"), self.expert_precision,
                     tuple(EXPERT_PRECISIONS))

    @classmethod
    def typed(cls, names: dict, /, *, stacklevel: int = 1, **fields) -> "OmniMoEConfig":
        """``cls(**fields)``, whose errors and ``UnroutedExpertsWarning`` call each field
        by the name its caller's user typed (``names``: field -> that name, e.g. another
        config's key or a command-line flag; the alias ``num_experts_per_tok`` is a field
        here).  ``stacklevel`` is ``warnings.warn``'s, 1 being the caller of this method."""
        self = cls.__new__(cls)
        # __init__ -> __post_init__ -> the check: three frames below the caller's.
        self._names, self._stacklevel = dict(names), stacklevel + 3
        self.__init__(**fields)
        return self

    @property
    def num_expert_sqrt(self) -> int:
        """N = isqrt(num_experts), the side of the router's grid."""
        return math.isqrt(self.num_experts)


class _ReadBack(int):
    """``OmniMoEConfig.num_experts_per_tok`` as read: an int equal to k, marked so that
    ``__post_init__`` can tell ``dataclasses.replace``'s copy of it from a value given."""

    __slots__ = ()


# The alias reads and writes the field.  Set after the class is built: the dataclass
# machinery takes the InitVar's default from the class body, where this name must hold it.
OmniMoEConfig.num_experts_per_tok = property(
    lambda self: None if self.num_experts_per_token is None else _ReadBack(self.num_experts_per_token),
    lambda self, v: setattr(self, "num_experts_per_token", v),
    doc="k under transformers' name: an alias of ``num_experts_per_token``.")


class OmniMoE(nn.Module):
    """One OmniMoE layer: ``out = mlp(h) + experts(h)`` for input of shape (..., H).

    Runs anywhere the three ops do: CUDA tensors go through the Triton kernels (router,
    atomic experts, fused activation) and cuBLAS; CPU tensors through the PyTorch paths
    (through the Triton interpreter under ``TRITON_INTERPRET=1``).  Traceable by
    ``torch.compile(fullgraph=True)``.

    Parameters (state_dict keys, shared with the public reference module):
        gate_proj, up_proj: nn.Linear(H, I, bias=False); down_proj: nn.Linear(I, H, bias=False)
        router_gate_x, router_gate_y: nn.Linear(H, N, bias=False)
        router_norm_x, router_norm_y: ``RouterNorm`` (BatchNorm1d, affine=False) with
            buffers running_mean, running_var, num_batches_tracked; ``nn.Identity`` (no
            keys) when ``config.router_norm == "none"``, ``RouterLayerNorm`` (no keys)
            when "layernorm"
        up_embed, down_embed: nn.Embedding(E, H)  (the atomic experts' u and v rows; the
            router reaches rows 0..N^2-1, all of them unless E is not a perfect square)

    Initialisation: Linear layers as nn.Linear; the expert embeddings normal with std
    1/sqrt(H) (nn.Embedding's default std 1 makes u . h grow like sqrt(H)).

    In training mode the router norms use batch statistics over all tokens of the call
    (which must then be more than one, as for any BatchNorm1d; an empty batch is fine).
    With ``sync_router_stats`` the count is over all processes, and fewer than two
    tokens there are normalised with the running statistics instead of raising.
    """

    def __init__(self, config: OmniMoEConfig):
        super().__init__()
        if not isinstance(config, OmniMoEConfig):
            raise TypeError(f"config must be an OmniMoEConfig, got {type(config).__name__}")
        self.config = config
        self.hidden_size = H = config.hidden_size
        self.intermediate_size = I = config.intermediate_size
        self.num_experts = E = config.num_experts
        self.num_expert_sqrt = N = config.num_expert_sqrt
        self.top_k = config.num_experts_per_token
        self.act = config.hidden_act

        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

        self.router_gate_x = nn.Linear(H, N, bias=False)
        self.router_gate_y = nn.Linear(H, N, bias=False)
        if config.router_norm == "batchnorm":
            self.router_norm_x = RouterNorm(N)
            self.router_norm_y = RouterNorm(N)
        elif config.router_norm == "layernorm":
            self.router_norm_x = RouterLayerNorm(N)
            self.router_norm_y = RouterLayerNorm(N)
        else:
            self.router_norm_x = nn.Identity()
            self.router_norm_y = nn.Identity()

        # ``sparse`` mirrors the gradient layout for code that inspects embeddings.
        self.up_embed = nn.Embedding(E, H, sparse=config.sparse_expert_grad)
        self.down_embed = nn.Embedding(E, H, sparse=config.sparse_expert_grad)
        self.reset_expert_parameters()

        # Set by omni_moe.distributed: the process group of the router norms' batch
        # statistics (set_router_stats_group; None: the world group), and the expert
        # branch over row-sharded tables (shard_expert_tables; None: the local tables).
        self.router_stats_group = None
        self.expert_sharding = None

    def __setstate__(self, state):
        # Whole-module pickles written before the attributes above were declared lack
        # them; they load with the defaults (nothing set by omni_moe.distributed).
        state.setdefault("router_stats_group", None)
        state.setdefault("expert_sharding", None)
        super().__setstate__(state)

    def reset_expert_parameters(self) -> None:
        std = 1.0 / math.sqrt(self.hidden_size)
        nn.init.normal_(self.up_embed.weight, std=std)
        nn.init.normal_(self.down_embed.weight, std=std)

    def extra_repr(self) -> str:
        c = self.config
        N = self.num_expert_sqrt
        grid = f"{N}^2" if N * N == c.num_experts else f"{N}^2 routed"
        return (f"hidden_size={c.hidden_size}, intermediate_size={c.intermediate_size}, "
                f"num_experts={c.num_experts} ({grid}), top_k={self.top_k}, "
                f"act={c.hidden_act!r}, router_norm={c.router_norm!r}")

    def route(self, h: torch.Tensor):
        """(scores, indices) of the k experts of each row of 2-D ``h``: scores are the
        float32 log-probabilities log p_x(i) + log p_y(j), indices int32 i*N + j.

        The k entries of a row come in no promised order (``omni_router(...,
        sorted=False)``): the expert sum does not depend on it, and past the router's
        fast path (k > 256) the final sort would cost more than the rest of the router."""
        plan = self.route_plan(h)
        if plan.mode is not None and plan.group is None:
            # gate GEMM, norm, log_softmax and router: one autograd node
            return router_stage(self, h, plan.mode)
        px, py = self._router_log_probs(h, plan)
        return omni_router(px, py, self.num_expert_sqrt, self.top_k, sorted=False)

    def route_plan(self, h: torch.Tensor) -> RoutePlan:
        """The ``RoutePlan`` of a call on 2-D ``h``: the statistics' process group
        (``omni_moe.distributed.router_stats_group``) and the router-norm kernels' mode
        for it (``_fused_router_mode``).  Reads the modules' state (training, hooks,
        norms) and ``h``'s device, dtype and row count, so it holds for this call only."""
        group = router_stats_group(self)
        if group is None:
            return RoutePlan(self._fused_router_mode(h), None)
        return RoutePlan(self._fused_router_mode(h, synced=True), group)

    def router_log_probs(self, h: torch.Tensor):
        """(px, py): float32 (T, N) log_softmax(norm(W_x h)), log_softmax(norm(W_y h)).

        Fast path (Triton tensors, eager): one GEMM with the stacked gate weights, then
        ``omni_moe.ops.router_norm.kernels`` (3 launches forward and backward in training, 1
        otherwise, instead of ~10 each way); px and py are the two column halves of one
        (T, 2N) tensor.  Same math as the plain path below, which runs otherwise (CPU,
        torch.compile -- where inductor fuses it --, N > 4096, momentum=None, hooks on
        the router modules, a training batch of fewer than 2 tokens).
        """
        return self._router_log_probs(h, self.route_plan(h))

    def _router_log_probs(self, h: torch.Tensor, plan: RoutePlan):
        mode, group = plan
        if group is not None:
            return sync_router_log_probs(self, h, group, mode is not None)
        if mode is None:
            lx, ly = self._plain_router_logits(h)
            return F.log_softmax(lx, dim=-1), F.log_softmax(ly, dim=-1)
        logits = F.linear(h, torch.cat((self.router_gate_x.weight, self.router_gate_y.weight)))
        if mode == "none":
            return fused_router_log_probs(logits, self.num_expert_sqrt, mode, None, 0.0, 0.0)
        nx, ny = self.router_norm_x, self.router_norm_y
        running = (nx.running_mean, nx.running_var, nx.num_batches_tracked,
                   ny.running_mean, ny.running_var, ny.num_batches_tracked)
        return fused_router_log_probs(logits, self.num_expert_sqrt, mode, running, nx.momentum, nx.eps)

    def normalized_router_logits(self, h: torch.Tensor):
        """(lx, ly): float32 (T, N) norm(W_x h), norm(W_y h), the logits ``router_log_probs``
        takes the log_softmax of (what a router z-loss reads), through PyTorch ops on
        every device.  In training it normalises with batch statistics (synchronised
        ones where ``router_log_probs`` would) and updates the running statistics, as one
        ``router_log_probs`` call does: call one of the two per step, not both."""
        group = router_stats_group(self)
        if group is not None:
            return sync_router_logits(self, h, group)
        return self._plain_router_logits(h)

    def _plain_router_logits(self, h: torch.Tensor):
        lx = self.router_norm_x(self.router_gate_x(h).float())
        ly = self.router_norm_y(self.router_gate_y(h).float())
        return lx.float(), ly.float()

    def _router_stats_group(self):
        """The process group the router norms' batch statistics are synchronised over,
        or None (``omni_moe.distributed.router_stats_group``)."""
        return router_stats_group(self)

    def _fused_router_mode(self, h: torch.Tensor, synced: bool = False):
        """The router-norm kernels' mode for ``h`` -- "none" / "batch" / "running" -- or
        None where the PyTorch ops run: the one rule, read by ``route_plan`` (a subclass
        may override it, e.g. to force the PyTorch path).  ``synced``: the batch
        statistics are synchronised across processes, which the kernels take for any
        local row count, 0 and 1 included (the modules are checked where they are used,
        ``router_stats.sync_router_log_probs``)."""
        from ..ops.router_norm.kernels import MAX_N

        if (not use_triton(h) or torch.compiler.is_compiling() or self.num_expert_sqrt > MAX_N
                or (h.shape[0] == 0 and not synced)):
            return None
        gx, gy, nx, ny = self.router_gate_x, self.router_gate_y, self.router_norm_x, self.router_norm_y
        if not all(is_plain(m) for m in (gx, gy, nx, ny)) or not castable(gx.weight, h):
            return None
        if synced:
            ok = (type(nx) is RouterNorm and type(ny) is RouterNorm and nx.momentum is not None
                  and nx.momentum == ny.momentum and nx.eps == ny.eps)
            return "batch" if ok else None
        if type(nx) is nn.Identity and type(ny) is nn.Identity:
            return "none"
        if not (type(nx) is RouterNorm and type(ny) is RouterNorm):
            return None
        if not (nx.track_running_stats and ny.track_running_stats and nx.training == ny.training
                and nx.momentum is not None and nx.momentum == ny.momentum and nx.eps == ny.eps
                and nx.running_mean is not None and ny.running_mean is not None):
            return None
        if nx.training:
            return "batch" if h.shape[0] >= 2 else None
        return "running"

    def forward(self, hidden_states: torch.Tensor, return_routing: bool = False):
        """``hidden_states`` (..., H) -> (..., H), same dtype.

        With ``return_routing=True`` returns ``(out, (scores, indices))`` (the k entries
        of a token in no promised order: see ``route``), scores float32
        log-probabilities and indices int32, both of shape (..., k).

        ``hidden_states`` must be a dense floating tensor of the parameters' dtype (no
        implicit cast; under ``torch.autocast`` any floating dtype), and with the
        BatchNorm router in training mode hold at least 2 tokens (or none): see
        ``omni_moe.ops._checks.check_layer_input``.
        """
        check_layer_input(self, hidden_states)
        check_expert_tables(self)
        shape = hidden_states.shape
        # (T, H) input as is: a same-shape reshape/view would add two autograd nodes.
        flat = hidden_states.dim() == 2
        h = hidden_states if flat else hidden_states.reshape(-1, self.hidden_size)
        # Under torch.autocast the layer computes in the autocast dtype
        # (layers/precision.py).  The router and the output stage take the input as it is
        # and cast it inside, as autocast casts per op: a float32 input then gets its
        # gradient terms summed in float32.  The unfused ops (``_unfused_output``) take the
        # cast copy.
        scores, indices = self.route(h)
        out = output_stage(self, h, scores, indices) if self.expert_sharding is None else None
        if out is None:
            out = self._unfused_output(h, scores, indices)
        out = out if flat else out.view(shape)
        if return_routing:
            lead = shape[:-1]
            return out, (scores.view(*lead, self.top_k), indices.view(*lead, self.top_k))
        return out

    def _unfused_output(self, h, scores, indices):
        """mlp(h) + experts(h) for 2-D ``h`` where ``output_stage`` does not apply (it
        returns None) or the expert tables are sharded."""
        amp = autocast_dtype(h)
        h = h if amp is None else h.to(amp)
        if self.expert_sharding is not None:
            # Expert tables sharded across processes (omni_moe.distributed.shard_expert_tables).
            experts = self.expert_sharding(self, h, scores, indices)
        else:
            # w = exp(scores) is fused into the expert kernels (no launch, no autograd node).
            experts = omni_expert_from_scores(h, self.up_embed.weight, self.down_embed.weight,
                                              scores, indices, act=self.act,
                                              sparse_grad=self.up_embed.sparse,
                                              precision=self.config.expert_precision)
        inner = swiglu(self.gate_proj(h), self.up_proj(h), self.act)
        if is_plain(self.down_proj) and self.down_proj.weight.dtype == experts.dtype:
            # experts + inner @ W_down^T in one cuBLAS call (the add in its epilogue).
            return torch.addmm(experts, inner, self.down_proj.weight.t())
        return self.down_proj(inner) + experts
