"""Import paths of the public upstream package (github.com/HKUSTDial/omni-moe, formerly
flash-algo/omni-moe), kept so that code written for it runs unchanged: thin adapters over
``omni_moe``'s public functions with upstream's names and signatures.  Its newest version
imports the three functions from this package (``interface``); its earlier one from the
per-op modules ``omni_router``, ``omni_expert``, ``omni_mlp`` (docs/compatibility.md)."""

from .interface import triton_omni_expert_func, triton_omni_mlp_func, triton_omni_router_func

__all__ = ["triton_omni_mlp_func", "triton_omni_router_func", "triton_omni_expert_func"]
