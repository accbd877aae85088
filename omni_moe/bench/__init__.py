"""Benchmarks behind ``omni-moe bench ...`` (see docs/benchmarks.md).

``router``: every router implementation, forward and backward, against the HBM floor.
``layer``: the whole OmniMoE layer; ``paper``: its ``--preset paper`` sweep (the OmniMoE
paper's efficiency experiment).  ``common``: timing, environment and CPU-thread helpers.
"""
