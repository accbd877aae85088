"""Pure-PyTorch references: the semantics every kernel is tested against."""

from .router import (
    router_backward_reference,
    router_bruteforce,
    router_pruned,
)

__all__ = ["router_bruteforce", "router_pruned", "router_backward_reference"]
