"""Run a Horovod PyTorch script unchanged on hpcaccel:

    mpirun -np 8 python -m hpcaccel.horovod train.py --epochs 3
    mpirun -np 8 python -m hpcaccel.horovod -m mypackage.train --epochs 3

For that process only, `import horovod` and `import horovod.torch` (and horovod.torch's
submodules) resolve to hpcaccel.torch; nothing on disk changes, and a real Horovod installed
beside it is untouched (other processes, and scripts run without this launcher, get it).
"""
from __future__ import annotations

import sys
import types

HOROVOD_VERSION = "0.28.1"  # the API hpcaccel.torch provides
# horovod.* module -> the hpcaccel module standing in for it
ALIASES = {
    "horovod.torch": "hpcaccel.torch",
    "horovod.torch.mpi_ops": "hpcaccel.torch.mpi_ops",
    "horovod.torch.functions": "hpcaccel.torch.functions",
    "horovod.torch.compression": "hpcaccel.torch.compression",
    "horovod.torch.optimizer": "hpcaccel.torch.optimizer",
    "horovod.common.exceptions": "hpcaccel.torch.basics",
    "horovod.common.process_sets": "hpcaccel.torch.process_sets",
}


def _run_not_supported(*args, **kwargs):
    raise NotImplementedError("hpcaccel does not support horovod.run; launch the script with "
                              "mpirun, srun or the Slurm templates (docs/scripts.md)")


def install() -> None:
    """Make `horovod` and its torch modules resolve to hpcaccel in this process. Idempotent."""
    import importlib

    if getattr(sys.modules.get("horovod"), "__hpcaccel__", False):
        return
    top = types.ModuleType("horovod", "hpcaccel standing in for Horovod's API (hpcaccel.horovod)")
    top.__version__, top.__hpcaccel__, top.__path__ = HOROVOD_VERSION, True, []
    top.run = _run_not_supported
    common = types.ModuleType("horovod.common")
    common.__path__ = []
    sys.modules["horovod"], sys.modules["horovod.common"] = top, common
    top.common = common
    for alias, real in ALIASES.items():
        module = importlib.import_module(real)
        sys.modules[alias] = module
        parent, _, child = alias.rpartition(".")
        setattr(sys.modules[parent], child, module)
