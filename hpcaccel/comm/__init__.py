"""Gradient reducers. The training loop sees only `Reducer`; `make_reducer` picks one.

Backends:
  horovod  Horovod's DistributedOptimizer (ring-allreduce, tensor fusion), when
           `horovod.torch` imports and was built with MPI (scripts/horovod.sh builds it).
  mpi      hpcaccel's own bucketed reducer over mpi4py; needs nothing beyond mpi4py.
  auto     the faster one for the device (comm/backend_choice.py): mpi on CPU; on CUDA horovod
           where it was built with GPU operations on every rank, else mpi.
"""
from __future__ import annotations

from ..config import BACKENDS, COMPRESSIONS
from .backend_choice import horovod_unavailable
from .base import Reducer


def _choose(name: str, control, device="auto") -> tuple[str, str | None]:
    """Collective. The backend every rank will use, and why (auto only). Ranks must agree,
    or their collectives would never match: the rule sees every rank's facts."""
    if name == "mpi":
        return "mpi", None
    if name == "auto":
        from .backend_choice import gather_auto
        return gather_auto(control, device)
    reasons = control.allgather(horovod_unavailable())
    missing = [r for r, why in enumerate(reasons) if why is not None]
    if not missing:
        return "horovod", None
    where = "" if len(missing) == len(reasons) else f" on rank(s) {missing[:8]}"
    from ..errors import UsageError
    raise UsageError(f"--backend horovod: not usable{where}: {reasons[missing[0]]}; build it "
                     f"with `bash scripts/horovod.sh .venv/bin/python` or use --backend mpi")


def make_reducer(name: str, comm=None, bucket_bytes: int | None = None, compression: str = "none",
                 fusion_bytes: int | None = None, cycle_time_ms: float | None = None,
                 timeline=None, powersgd_rank: int = 4, powersgd_start_step: int = 0,
                 allreduce: str = "auto", device="auto", shard: str = "none") -> Reducer:
    """Build the reducer named `name` (auto: the best available). Collective.

    comm: the job's mpi4py communicator (default COMM_WORLD). timeline: a Timeline
    (--timeline) the reducer records its communication in (None: nothing recorded). bucket_bytes: the mpi reducer's bucket size (None: from the link, --bucket-mb auto). compression: gradients on the wire as
    none, fp16 or bf16 (horovod: none or fp16), or powersgd (mpi only; auto picks mpi) with
    powersgd_rank and powersgd_start_step. allreduce: the mpi reducer's algorithm
    (comm/allreduce_choice.py: auto, sliced, ring, hierarchical). fusion_bytes, cycle_time_ms: Horovod's
    tensor-fusion threshold and cycle time (None: Horovod's default or its environment).
    shard: the mpi reducer's sharded optimizer (none, optimizer, gradients; auto picks mpi).
    device: --device (auto, cpu, cuda), which --backend auto's choice depends on; the
    reducer's `chosen_because` then says why (comm/backend_choice.py).
    """
    from ..errors import UsageError

    if name not in BACKENDS:
        raise UsageError(f"--backend: unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if compression not in COMPRESSIONS:
        raise UsageError(f"--compression: unknown {compression!r} (choose from {', '.join(COMPRESSIONS)})")
    if compression == "powersgd":
        if name == "horovod":
            raise UsageError("--compression powersgd: only the mpi backend has it (Horovod has "
                             "no PowerSGD); use --backend mpi")
        name = "mpi"
    if shard != "none":
        if name == "horovod":
            raise UsageError("--shard: the mpi backend's; Horovod has no sharded optimizer "
                             "(use --backend mpi or auto)")
        name = "mpi"
    from ..control import ControlPlane

    control = ControlPlane(comm)
    chosen, why = _choose(name, control, device)
    if chosen == "horovod":
        from .horovod import HorovodReducer
        reducer = HorovodReducer(comm=control.comm, compression=compression,
                                 fusion_bytes=fusion_bytes, cycle_time_ms=cycle_time_ms,
                                 timeline=timeline)
    else:
        from .mpi import MPIReducer
        reducer = MPIReducer(comm=control.comm, bucket_bytes=bucket_bytes, compression=compression,
                             timeline=timeline, powersgd_rank=powersgd_rank,
                             powersgd_start_step=powersgd_start_step, algorithm=allreduce,
                             shard=shard)
    reducer.chosen_because = why
    return reducer


def reducer_options(cfg) -> dict:
    """make_reducer's keyword arguments from a TrainConfig."""
    def to_bytes(mb):
        return None if mb in (None, "auto") else int(float(mb) * 2**20)
    return {"bucket_bytes": to_bytes(cfg.bucket_mb), "compression": cfg.compression,
            "fusion_bytes": to_bytes(cfg.fusion_mb), "cycle_time_ms": cfg.cycle_time_ms,
            "powersgd_rank": cfg.powersgd_rank, "powersgd_start_step": cfg.powersgd_start_step,
            "allreduce": cfg.allreduce, "device": cfg.device, "shard": cfg.shard}


__all__ = ["Reducer", "make_reducer", "reducer_options", "horovod_unavailable", "BACKENDS",
           "COMPRESSIONS"]
