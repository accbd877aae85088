"""Row-wise optimizer updates of tables with sparse row gradients (the expert tables under
``sparse_expert_grad=True``): ``kernels`` (the Triton kernel, its launcher and the
PyTorch path of CPU tensors) and ``reference`` (the test oracle).  The optimizers that
use it are in ``omni_moe.optim``."""

from .kernels import RowUpdateConfig, row_update

__all__ = ["RowUpdateConfig", "row_update"]
