"""SwiGLU's PyTorch path (CPU tensors without ``TRITON_INTERPRET=1``): the kernels' formula

    out = act(gate) * up,   dgate = dout * up * act'(gate),   dup = dout * act(gate)

in float32, each output rounded once to its dtype.
"""

from __future__ import annotations

from .._activations import activation, activation_and_grad


def swiglu_forward_torch(gate, up, act):
    """The forward formula in PyTorch: float32 math, one rounding to the input dtype."""
    return (activation(gate.float(), act) * up.float()).to(gate.dtype)


def swiglu_backward_torch(grad, gate, up, act):
    g, u, d = gate.float(), up.float(), grad.float()
    z, dz = activation_and_grad(g, act)
    return (d * u * dz).to(gate.dtype), (d * z).to(up.dtype)
