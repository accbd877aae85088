"""The router's prologue: BatchNorm (batch or running statistics) + log-softmax of both
router axes, as Triton kernels (``kernels``)."""
