"""The ops: one folder each, holding its contract, PyTorch reference, Triton kernels with
their launch rules, and the custom op / autograd glue.

- ``router``: the omni router (top-k of the N x N Cartesian-product grid).
- ``expert``: the atomic experts, executed expert-centrically.
- ``swiglu``: the shared dense MLP's fused gated activation.
- ``router_norm``: the router's BatchNorm + log-softmax prologue kernels.

``triton/`` keeps the public upstream project's import paths (thin adapters).
"""

from .expert.op import omni_expert
from .router.op import omni_router
from .swiglu.op import swiglu, swiglu_mlp

__all__ = ["omni_router", "omni_expert", "swiglu", "swiglu_mlp"]
