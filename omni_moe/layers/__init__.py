"""Layers built from the ops; ``reference`` is the float64-capable oracle of the OmniMoE
layer."""
