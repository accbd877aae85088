"""Count what one eager step costs the host: Triton launches, CUDA kernels, autograd nodes.

The eager layer is host-bound at small sizes (each Triton launch and each autograd node
costs microseconds of CPU time, docs/layer.md), so these counts are the quantities to
drive down; they are exact and need no timing.

- ``count_triton_launches()``: context manager counting every Triton kernel launch
  (``kernel[grid](...)``) by kernel name, on CUDA and under ``TRITON_INTERPRET=1``.
- ``count_cuda_kernels(fn)``: runs ``fn`` under ``torch.profiler`` and counts the
  kernels that ran on the GPU (Triton, cuBLAS, aten) and the host's launch calls.
- ``autograd_nodes(*outputs)``: the backward graph's nodes by type.
- ``step_counts(module, x)``: all of the above for one forward + backward of ``module``.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch


def _launch_classes():
    classes = []
    from triton.runtime.jit import JITFunction

    classes.append(JITFunction)
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - older Triton
        InterpretedFunction = None
    if InterpretedFunction is not None:
        classes.append(InterpretedFunction)
    return classes


def _kernel_name(fn) -> str:
    inner = getattr(fn, "fn", None)
    return getattr(inner, "__name__", None) or getattr(fn, "__name__", type(fn).__name__)


@contextlib.contextmanager
def count_triton_launches():
    """Yields a ``Counter`` {kernel name: launches} filled while the block runs.

    Counts calls of ``JITFunction.run`` / ``InterpretedFunction.run`` that launch (not
    ``warmup``); an autotuner's benchmark launches count too.  Not thread-safe: the
    patch is process-wide while the block runs.
    """
    counts: Counter = Counter()
    patched = []
    for cls in _launch_classes():
        orig = cls.__dict__.get("run")
        if orig is None:
            continue

        def run(self, *args, _orig=orig, **kwargs):
            if not kwargs.get("warmup", False):
                counts[_kernel_name(self)] += 1
            return _orig(self, *args, **kwargs)

        cls.run = run
        patched.append((cls, orig))
    try:
        yield counts
    finally:
        for cls, orig in patched:
            cls.run = orig


_HOST_LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                      "cudaLaunchCooperativeKernel", "cudaGraphLaunch")


def count_cuda_kernels(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` under ``torch.profiler``; returns (result, stats) with
    stats = {"kernels": GPU kernels run, "launch_calls": host launch API calls,
    "by_kernel": Counter of GPU kernel names, "memcpy": copies, "memset": fills}.
    CUDA only (needs the profiler's CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = fn(*args, **kwargs)
        torch.cuda.synchronize()
    by_kernel: Counter = Counter()
    launches = memcpy = memset = 0
    for evt in prof.events():
        name = evt.name
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            low = name.lower()
            if "memcpy" in low:
                memcpy += 1
            elif "memset" in low:
                memset += 1
            else:
                by_kernel[name] += 1
        elif name in _HOST_LAUNCH_CALLS:
            launches += 1
    return result, {"kernels": sum(by_kernel.values()), "launch_calls": launches,
                    "by_kernel": by_kernel, "memcpy": memcpy, "memset": memset}


def autograd_nodes(*outputs) -> Counter:
    """{node type name: count} of the distinct nodes of the backward graph reachable from
    ``outputs`` (tensors), ``AccumulateGrad`` (one per leaf that receives a gradient)
    included."""
    seen, stack, counts = set(), [], Counter()
    for t in outputs:
        if isinstance(t, torch.Tensor) and t.grad_fn is not None:
            stack.append(t.grad_fn)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        counts[type(node).__name__] += 1
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return counts


def step_counts(module, x: torch.Tensor, *, profile_cuda: bool = False) -> dict:
    """Counts of one eager forward + backward (loss: sum of squares) of ``module`` on ``x``.

    Returns {"triton_forward", "triton_backward": Counter by kernel, "triton_launches":
    total, "autograd_nodes": total without AccumulateGrad, "accumulate_grad": leaves,
    "nodes_by_type": Counter} and, with ``profile_cuda`` on a CUDA input, "cuda": the
    ``count_cuda_kernels`` stats of the whole step.  Gradients accumulate into the
    module's ``.grad`` as in a training step.
    """
    def run():
        with count_triton_launches() as fwd:
            out = module(x)
            loss = out.float().square().sum()
        nodes = autograd_nodes(loss)
        with count_triton_launches() as bwd:
            loss.backward()
        return fwd, bwd, nodes

    stats = None
    if profile_cuda and x.is_cuda:
        (fwd, bwd, nodes), stats = count_cuda_kernels(run)
    else:
        fwd, bwd, nodes = run()
    acc = nodes.get("AccumulateGrad", 0)
    res = {"triton_forward": fwd, "triton_backward": bwd,
           "triton_launches": sum(fwd.values()) + sum(bwd.values()),
           "autograd_nodes": sum(nodes.values()) - acc, "accumulate_grad": acc,
           "nodes_by_type": nodes}
    if stats is not None:
        res["cuda"] = stats
    return res
