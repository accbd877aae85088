"""Import paths of the first public upstream versions (2026-02-04/05), for code written
against them (docs/compatibility.md, "Paths").

The kernels live in ``omni_moe.ops``; these modules only re-export entry points.
"""
