"""Argument checks shared by the public functions and the layer.

Every check raises TypeError/ValueError naming the offending argument, before any work
(and before torch fails somewhere inside with a message about its own internals).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import warnings

import numpy as np
import torch

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_int(v) -> int | None:
    """``v`` as a plain Python int when it is an integer scalar -- an int, a numpy
    integer, a 0-d integer torch tensor -- else None.  Booleans are not integers here
    (``True`` as a size or a count is a mistake, not 1)."""
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, torch.Tensor) and (v.dim() != 0 or v.dtype == torch.bool
                                        or v.is_floating_point() or v.is_complex()):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def check_int(name: str, v, lo: int | None = None, hi: int | None = None) -> int:
    """``v`` as a plain Python int (store the result: numpy and torch integer scalars
    become ints, so configs serialise and compare equal); TypeError naming ``name``
    unless ``v`` is an integer scalar (``bool`` is not), ValueError unless
    ``lo <= v <= hi`` (either bound may be None)."""
    i = v if type(v) is int else as_int(v)
    if i is None:
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if (lo is not None and i < lo) or (hi is not None and i > hi):
        rng = (f"in [{lo}, {hi}]" if lo is not None and hi is not None
               else f">= {lo}" if lo is not None else f"<= {hi}")
        raise ValueError(f"{name} must be {rng}, got {i}")
    return i


def check_pow2(name: str, v, lo: int = 1) -> int:
    """``check_int`` for a power of two >= ``lo`` (tile sizes, warp counts)."""
    i = check_int(name, v)
    if i < lo or i & (i - 1):
        raise ValueError(f"{name} must be a power of two >= {lo}, got {i}")
    return i


def check_choice(name: str, v, choices) -> str:
    """``v`` unchanged; TypeError naming ``name`` unless it is a str, ValueError unless it
    is one of ``choices``."""
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(v).__name__}")
    if v not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {v!r}")
    return v


def check_float(name: str, v, lo: float | None = None):
    """``v`` unchanged; TypeError naming ``name`` unless it is an int or a float (``bool``
    is not), ValueError unless it is finite and >= ``lo`` (no range check when None)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    if lo is not None and not (math.isfinite(v) and v >= lo):
        raise ValueError(f"{name} must be a finite number >= {lo}, got {v}")
    return v


def check_betas(betas) -> tuple[float, float]:
    """Adam's (beta1, beta2) as floats; TypeError unless a pair of numbers, ValueError
    naming ``betas[i]`` unless each is in [0, 1)."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    for name, b in zip(("betas[0]", "betas[1]"), betas):
        if not check_float(name, b, 0.0) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b}")
    return float(betas[0]), float(betas[1])


class UnroutedExpertsWarning(UserWarning):
    """``num_experts`` is not a perfect square: the router's N x N grid (N = isqrt(E))
    addresses the expert tables' first N*N rows only; the others are never routed and
    never get a gradient."""


def check_num_experts(name: str, v, max_sqrt: int, *, stacklevel: int = 2) -> tuple[int, int]:
    """``(E, N)``: ``v`` as a Python int in [1, max_sqrt**2] (``check_int``) and the router
    grid's side N = isqrt(E).

    A count that is not a perfect square is accepted, as the public upstream module runs
    it (its checkpoints hold E rows and route over floor(sqrt(E))**2 of them), with one
    ``UnroutedExpertsWarning`` that names the rows no token will reach; ``stacklevel``
    is ``warnings.warn``'s, counted as if this function were it (1: its caller)."""
    e = check_int(name, v, 1, max_sqrt**2)
    n = math.isqrt(e)
    if n * n != e:
        unrouted = f"row {e - 1} is" if e - n * n == 1 else f"rows {n * n}..{e - 1} are"
        warnings.warn(
            f"{name}={e} is not a perfect square: the router's N x N grid (N = {n}) addresses "
            f"experts 0..{n * n - 1}; the expert tables keep {e} rows and {unrouted} never "
            f"routed (for a new model use a square, e.g. {n * n} or {(n + 1) ** 2})",
            UnroutedExpertsWarning, stacklevel=stacklevel + 1)
    return e, n


def with_fields(config, **values):
    """``config`` (a frozen dataclass) holding ``values``: itself when they are the objects
    it holds (checked plain ints come back as the same object, so an explicit launch
    config costs no copy per call), else ``dataclasses.replace`` of it."""
    def same(a, b):
        return a is b or (type(a) is tuple and type(b) is tuple and len(a) == len(b)
                          and all(x is y for x, y in zip(a, b)))

    if all(same(getattr(config, k), v) for k, v in values.items()):
        return config
    return dataclasses.replace(config, **values)


def check_dense(name: str, t: torch.Tensor) -> None:
    """TypeError unless ``t`` is a dense (strided) tensor: sparse layouts (COO, CSR, CSC,
    BSR, BSC), nested and mkldnn tensors have no strides for the kernels to read, and the
    PyTorch paths would fail deep inside torch.  Meta tensors are dense: they run the
    PyTorch paths and give the output shapes (deferred initialisation, shape tracing)."""
    if t.is_nested:
        raise TypeError(f"{name} must be a dense tensor, got a nested tensor")
    if t.layout != torch.strided:
        raise TypeError(
            f"{name} must be a dense (strided) tensor, got layout {t.layout}; "
            f"convert it with .to_dense()")


def check_float_tensor(name: str, t, dims: int | None = None) -> None:
    """TypeError unless ``t`` is a dense float32/float16/bfloat16 tensor; ValueError unless
    it has ``dims`` dimensions (None: at least one)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_dense(name, t)
    if t.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if dims is None and t.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *,
               dtype=True, shape=True) -> None:
    """``t`` on ``ref``'s device (ValueError), with its dtype (TypeError) and shape
    (ValueError) where asked."""
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}")


def check_layer_input(layer, hidden_states) -> None:
    """Validate the input of ``OmniMoE.forward`` (``layer``) before any work.

    Dtype rule: the input must have the dtype of the weights that read it (the gate,
    up and router projections); a mismatch raises TypeError naming both rather than being
    cast silently (a cast would hide a half-converted model and copy the activations).
    Under ``torch.autocast`` for the input's device the layer casts the input and weights
    to the autocast dtype (``omni_moe.layers.precision``), so there any float32, float16
    or bfloat16 input is accepted (float64, which autocast leaves alone, is not).
    """
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    check_dense("hidden_states", hidden_states)
    if not hidden_states.is_floating_point():
        raise TypeError(
            f"hidden_states must be a floating-point tensor, got {hidden_states.dtype}")
    wdt = layer.gate_proj.weight.dtype
    if wdt not in _KERNEL_DTYPES:
        raise TypeError(
            f"OmniMoE's parameters are {wdt}; it runs in float32, float16 or bfloat16: "
            f"cast the module with .float(), .half() or .bfloat16()")
    if hidden_states.dtype != wdt and (hidden_states.dtype not in _KERNEL_DTYPES or
                                       not torch.is_autocast_enabled(hidden_states.device.type)):
        raise TypeError(
            f"hidden_states has dtype {hidden_states.dtype} but OmniMoE's parameters are "
            f"{wdt}; cast one to the other (e.g. hidden_states.to({wdt}))")
    H = layer.hidden_size
    if hidden_states.dim() < 1 or hidden_states.shape[-1] != H:
        raise ValueError(
            f"hidden_states must have shape (..., hidden_size={H}), got "
            f"{tuple(hidden_states.shape)}")
    norm = layer.router_norm_x
    if (hidden_states.numel() // H == 1
            and isinstance(norm, torch.nn.modules.batchnorm._BatchNorm)
            and (norm.training or norm.running_mean is None)
            # synchronised statistics count the tokens of every process, and fall back
            # to the running statistics below 2 in total (omni_moe.layers.router_stats)
            and layer._router_stats_group() is None):
        raise ValueError(
            "router_norm='batchnorm' needs at least 2 tokens in training mode: the router "
            "normalises its logits with statistics over the tokens of the call, and one "
            "token has no variance. Pass more tokens, call .eval() (running statistics), "
            "or build the layer with router_norm='none'")
