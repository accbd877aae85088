"""The first upstream path of the fast router: ``triton_omni_router_func_optimized`` is
``omni_moe.omni_router`` (the pruned kernels of ``omni_moe.ops.router.pruned``)."""

from ..ops.router.op import omni_router as triton_omni_router_func_optimized

__all__ = ["triton_omni_router_func_optimized"]
