"""Triton kernels.  One file per op; small shared helpers in ``utils``."""
