import importlib
import pkgutil

import omni_moe

# Tests here switch TRITON_INTERPRET off to run the PyTorch paths fast.  Triton fixes a
# kernel's mode (interpreter or compiled) when its module is imported, so import every
# kernel module now, at collection, in the mode the session was started with; a lazy
# first import inside such a test would leave later interpreter tests compiled kernels.
for _m in pkgutil.walk_packages(omni_moe.__path__, "omni_moe."):
    if _m.name.startswith("omni_moe.hf") or _m.name.endswith("__main__"):
        continue
    importlib.import_module(_m.name)
