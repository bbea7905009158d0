"""What `--backend auto` picks, and why: the faster reducer for the device.

  CPU   the mpi reducer. Measured on this project's CPU benchmarks (docs/backends.md,
        docs/benchmarks.md): Horovod's background thread polls MPI every cycle (about 1 ms)
        on the cores the ranks compute on; the mpi reducer trained the MLP 1.4x faster and
        the 8-rank digits run about 20% faster.
  CUDA  Horovod when it was built with GPU operations (NCCL or CUDA) on every rank: it
        reduces on the device. Otherwise the mpi reducer.

`auto_backend` is the rule (pure); the training loop (`make_reducer`) and the doctor both
call it. Cross-rank invariant: it is given the facts of every rank (after an allgather), so
every rank computes the same answer.
"""
from __future__ import annotations


def device_type(device) -> str:
    """Local. "cuda" or "cpu": what --device (auto, cpu, cuda, or a torch.device) gives here."""
    text = str(device)
    if text == "auto":
        import torch
        return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"
    return "cuda" if text.startswith("cuda") else "cpu"


def horovod_gpu_ops() -> bool:
    """Local. Whether the importable Horovod was built with GPU operations (False if it does
    not import)."""
    try:
        import horovod.torch as hvd
        return bool(hvd.nccl_built() or hvd.cuda_built())
    except Exception:  # noqa: BLE001 - an unusable Horovod has no GPU operations
        return False


def auto_backend(device_types: list[str], horovod_reasons: list[str | None] | None = None,
                 gpu_ops: list[bool] | None = None) -> tuple[str, str]:
    """Pure. (backend, why) for --backend auto, from every rank's device type, and, where
    every rank is on CUDA, why Horovod is unusable per rank (None: usable) and whether it
    has GPU operations per rank."""
    if not device_types or any(t != "cuda" for t in device_types):
        return "mpi", ("auto: CPU training, where the mpi reducer is measured faster than "
                       "Horovod (docs/backends.md)")
    reasons = horovod_reasons or [None] * len(device_types)
    missing = [r for r, why in enumerate(reasons) if why is not None]
    if missing:
        where = "" if len(missing) == len(reasons) else f" on rank(s) {missing[:8]}"
        return "mpi", f"auto: CUDA, but Horovod is not usable{where} ({reasons[missing[0]]})"
    without = [r for r, ok in enumerate(gpu_ops or [False] * len(device_types)) if not ok]
    if without:
        where = "" if len(without) == len(device_types) else f" on rank(s) {without[:8]}"
        return "mpi", f"auto: CUDA, but Horovod was built without GPU operations{where}"
    return "horovod", "auto: CUDA and Horovod built with GPU operations (NCCL) on every rank"


def horovod_unavailable() -> str | None:
    """Local. Why the Horovod backend cannot be used in this process, or None if it can."""
    try:
        import horovod.torch as hvd
    except Exception as e:  # noqa: BLE001 - a wheel built for another torch fails with OSError etc.
        first_line = (str(e).splitlines() or [""])[0]
        return f"horovod.torch does not import ({type(e).__name__}: {first_line})"
    if not hvd.mpi_built():
        return "Horovod was built without MPI"
    return None


def gather_auto(control, device="auto") -> tuple[str, str]:
    """Collective over control (a ControlPlane or an mpi4py communicator). --backend auto's
    (backend, why); Horovod is only probed where every rank is on CUDA."""
    types = control.allgather(device_type(device))
    if any(t != "cuda" for t in types):
        return auto_backend(types)
    facts = control.allgather((horovod_unavailable(), horovod_gpu_ops()))
    return auto_backend(types, [f[0] for f in facts], [f[1] for f in facts])


def backend_phrase(reducer) -> str:
    """Local. The start-up line's backend: what runs, and why where auto chose it."""
    why = getattr(reducer, "chosen_because", None)
    return reducer.describe() + (f" ({why})" if why else "")
