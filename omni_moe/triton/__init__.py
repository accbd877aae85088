"""Import paths of the seed change request, kept for code written against it.

The kernels live in ``omni_moe.ops``; these modules only re-export entry points.
"""
