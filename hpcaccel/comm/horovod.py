"""The Horovod backend: Horovod's DistributedOptimizer behind the Reducer interface.

How a step flows (the contract of base.Reducer, as the mpi reducer keeps it):
  zero_grad()   every .grad set to None.
  backward()    Horovod's hooks start each gradient's allreduce (op Average) when it is ready;
                Horovod's background thread fuses ready tensors, up to the fusion threshold,
                once per cycle.
  synchronize() starts the allreduces the hooks did not (a parameter without a gradient on
                this rank contributes zeros), waits; each .grad is then the mean over ranks.
  then          the caller's optimizer steps; nothing is communicated.

Cross-rank invariants:
  * Horovod matches collectives by name, not by call order: each gradient is named after its
    parameter, so ranks may produce gradients in different orders.
  * A parameter that got no gradient on any rank ends with .grad None on every rank, as with
    the mpi reducer. One small "used" allreduce per step, started before waiting for the
    gradients (so Horovod fuses it with the last of them), tells every rank which those are.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..collectives import TRACKER
from .base import Reducer

# A backward-pass count Horovod's hooks never reach: while it is set, hooks only record
# that a gradient arrived, and synchronize() starts the allreduces.
_NEVER = 2**62
_KNOBS = ("HOROVOD_FUSION_THRESHOLD", "HOROVOD_CYCLE_TIME")

# Horovod is initialised once per process and left running (hvd.init registers its own
# shutdown at exit). Horovod 0.28.1 cannot be re-initialised reliably after hvd.shutdown():
# knobs of an earlier init stay in force, and once both have been set by some init, the
# next init segfaults (in ParameterManager::BayesianParameter::SetValue).
_started_with: dict | None = None  # the knobs this process's hvd.init was given


def _start_horovod(hvd, comm, fusion_bytes, cycle_time_ms) -> None:
    """Initialise Horovod on `comm` with the given knobs (None: Horovod's default or the
    environment's), unless this process already did; a running Horovod keeps its knobs."""
    global _started_with
    knobs = dict(zip(_KNOBS, (fusion_bytes, cycle_time_ms)))
    if hvd.is_initialized():
        started = _started_with or {}  # None: started outside hpcaccel, knobs unknown
        clash = [k for k, v in knobs.items() if v is not None and started.get(k) != v]
        if clash:
            raise RuntimeError(f"Horovod already runs in this process and its {', '.join(clash)} "
                               f"cannot change (Horovod reads them once, in hvd.init)")
        return
    saved = {k: os.environ.get(k) for k in knobs}
    # Horovod reads its knobs from the environment, once, inside init.
    for k, v in knobs.items():
        if v is not None:
            os.environ[k] = str(v)
    try:
        hvd.init(comm=comm)
        _started_with = knobs
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _compressor(hvd, compression: str):
    if compression == "none":
        return hvd.Compression.none
    if compression == "fp16":
        return hvd.Compression.fp16
    from ..errors import UsageError
    raise UsageError(f"--compression {compression}: Horovod 0.28 cannot allreduce bfloat16 "
                     f"tensors; use fp16, or --backend mpi")


class HorovodReducer(Reducer):
    name = "horovod"

    def __init__(self, comm=None, compression: str = "none", fusion_bytes: int | None = None,
                 cycle_time_ms: float | None = None, timeline=None):
        """fusion_bytes, cycle_time_ms: HOROVOD_FUSION_THRESHOLD and HOROVOD_CYCLE_TIME
        (None: Horovod's defaults, 128 MiB and 1 ms, or the environment's values). They
        take effect in the first reducer of a process; see _start_horovod."""
        import horovod.torch as hvd
        from mpi4py import MPI

        self.hvd = hvd
        super().__init__(comm or MPI.COMM_WORLD, timeline)
        self.compression = _compressor(hvd, compression)
        _start_horovod(hvd, self.comm, fusion_bytes, cycle_time_ms)
        if (hvd.rank(), hvd.size()) != (self.rank, self.size):
            raise RuntimeError(f"Horovod runs as rank {hvd.rank()} of {hvd.size()}, the "
                               f"communicator says {self.rank} of {self.size}")
        self._ops = {"sum": hvd.Sum, "max": hvd.Max, "min": hvd.Min}
        self._distributed = None  # Horovod's DistributedOptimizer: hooks and synchronize only
        self._params: list[torch.nn.Parameter] = []
        self._no_sync_depth = 0

    def describe(self) -> str:
        """The start-up line's phrase: which of Horovod's operations this build has. CPU
        tensors are reduced by its CPU operations (MPI or Gloo) whatever the build; GPU
        tensors on the device only with GPU operations (else through host memory)."""
        hvd = self.hvd
        cpu = "+".join(n for n, ok in (("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built())) if ok)
        gpu = [n for n, ok in (("NCCL", hvd.nccl_built()), ("CUDA", hvd.cuda_built())) if ok]
        return (f"{self.name} (CPU operations: {cpu or 'none'}; "
                f"GPU operations: {'+'.join(gpu) if gpu else 'none'})")

    # -- set-up ---------------------------------------------------------------------------
    def broadcast_parameters(self, module, root=0):
        # state_dict: parameters and buffers (BatchNorm statistics), as views updated in place
        self.hvd.broadcast_parameters(module.state_dict(), root_rank=root)

    def attach(self, model, optimizer):
        self.optimizer = optimizer
        # what Horovod averages: the optimizer's trainable parameters, in the same order on
        # every rank (the order of the "used" flags in synchronize)
        self._params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._grad_bytes = sum(p.numel() * p.element_size() for p in self._params)
        # Horovod's wrapper is a second optimizer object with its own, empty state. We use it
        # only to communicate and step the caller's optimizer ourselves, so there is one
        # owner of momentum/Adam state: checkpoints, restores and LR schedules all see it.
        self._distributed = self.hvd.DistributedOptimizer(
            optimizer, named_parameters=list(model.named_parameters()),
            compression=self.compression, op=self.hvd.Average)
        self.zero_grad()

    # -- per step -------------------------------------------------------------------------
    def zero_grad(self):
        self._distributed.zero_grad()  # Horovod's: refuses while allreduces are in flight
        for p in self._params:
            p.grad = None  # synchronize() reads "has a .grad" as "this rank produced one"

    def synchronize(self):
        if self.size == 1:
            return  # Horovod registers no hooks for one rank: the local gradient is the mean
        used = torch.tensor([p.grad is not None for p in self._params], dtype=torch.float32)
        # Horovod's hooks started the allreduces during backward; a rank blocks only here,
        # so the hang report sees the whole step's gradient exchange as one collective.
        TRACKER.enter("gradient allreduce (horovod)", self._grad_bytes, "gradients")
        handle = self.hvd.allreduce_async_(used, op=self.hvd.Sum, name="hpcaccel.used_gradients")
        self._distributed.synchronize()
        self.hvd.synchronize(handle)
        TRACKER.leave("gradients")
        for p, count in zip(self._params, used.tolist()):
            if count == 0:
                p.grad = None  # no rank produced one: Horovod averaged zeros; skip it everywhere

    # The caller steps its own optimizer after synchronize(). Horovod's wrapper's step() would
    # only add a second synchronize, which its own skip_synchronize() exists to turn off.

    @contextlib.contextmanager
    def no_sync(self):
        # Horovod's hooks start a parameter's allreduce on its backward_passes_per_step-th
        # gradient. Inside no_sync that count is out of reach; on leaving, it is reset to 1 for
        # every parameter, so the next (final) backward starts each allreduce as soon as the
        # gradient is complete, overlapping with the rest of backward, however many
        # micro-batches came before. Parameters without a gradient in that final pass are
        # started by synchronize().
        self._no_sync_depth += 1
        if self._no_sync_depth == 1:
            self._distributed.set_backward_passes_per_step(_NEVER)
        try:
            yield
        finally:
            self._no_sync_depth -= 1
            if self._no_sync_depth == 0:
                self._distributed.set_backward_passes_per_step(1)

    # -- tensors --------------------------------------------------------------------------
    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` over ranks in place (op: sum, max, min) and return it."""
        name = f"hpcaccel.tensor.{op}.{tensor.dtype}.{tuple(tensor.shape)}"
        if tensor.is_contiguous():
            return self.hvd.allreduce_(tensor, op=self._ops[op], name=name)
        dense = self.hvd.allreduce_(tensor.detach().contiguous(), op=self._ops[op], name=name)
        with torch.no_grad():
            tensor.copy_(dense)  # Horovod reduces contiguous tensors only
        return tensor

    def close(self):
        if self._distributed is not None:
            # Horovod's hooks stay on the parameters' gradient accumulators: make them inert,
            # so a later backward on this model never starts an allreduce.
            self._distributed.set_backward_passes_per_step(_NEVER)
            self._distributed = None
        # Horovod itself keeps running until the process exits (see _start_horovod).
