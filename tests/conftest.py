import importlib
import os
import pkgutil
import sys

import pytest
import torch

import omni_moe

sys.path.insert(0, os.path.dirname(__file__))

# Some tests switch TRITON_INTERPRET off to run the PyTorch paths.  Triton fixes a
# kernel's mode (interpreter or compiled) when its module is imported, so every kernel
# module is imported now, at collection, in the mode the test run was started with; a
# lazy first import inside such a test would leave later interpreter tests compiled.
for _m in pkgutil.walk_packages(omni_moe.__path__, "omni_moe."):
    if not (_m.name.startswith("omni_moe.hf") or _m.name.endswith("__main__")):
        importlib.import_module(_m.name)

# Under pytest-xdist (``-n``) each worker is a process: torch's default of one thread per
# core would put workers x cores threads on the cores, and each parallel region then waits
# for threads that another worker holds off its core (docs/benchmarks.md, "CPU runs").
# The workers share the cores instead.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# Kernel tests run on CUDA when present, else on CPU through Triton's interpreter.
HAS_CUDA = torch.cuda.is_available()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relpath: str, name: str):
    """The repository script ``relpath`` (e.g. "benchmarks/generate.py") imported as a
    module registered under ``name`` (its dataclasses look their module up while it
    loads); the caller pops ``sys.modules[name]`` when done."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def script_module(relpath: str, name: str):
    """Body of a script fixture (``yield from script_module(...)``): the loaded module,
    unregistered from ``sys.modules`` at teardown."""
    try:
        yield load_script(relpath, name)
    finally:
        sys.modules.pop(name, None)


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state (tests that draw from torch's
    global generator are reproducible; most use their own seeded generators)."""
    torch.manual_seed(0)


@pytest.fixture
def device():
    if HAS_CUDA:
        return "cuda"
    if not INTERPRET:
        pytest.fail("kernel tests need CUDA or TRITON_INTERPRET=1 (see README)")
    return "cpu"


@pytest.fixture
def no_tf32():
    """float32 matmuls in full precision for the test (comparisons against float64)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def torch_path(monkeypatch):
    """CPU tensors take the PyTorch paths for the test, whatever TRITON_INTERPRET says
    (the contract: the interpreter runs the kernels only when it is set; scripts and
    model-level tests would take minutes through it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(params=["kernels", "torch"])
def path(request, monkeypatch, device):
    """The Triton kernels (CUDA / interpreter) or the PyTorch path (CPU, interpreter off):
    the device to put the test's tensors on."""
    if request.param == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        return "cpu"
    return device
