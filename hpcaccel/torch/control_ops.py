"""The control plane of a script (hvd.Job's votes and checkpoint gathers,
DistributedOptimizer's votes, RankData's agreement, the timeline's gathers) on hvd's
engine: the same ControlPlane interface (hpcaccel/control.py), each call one engine
operation, agreed in program order with the tensor collectives and the gradient
exchanges (agreement.py).

So a rank in Job.should_stop()'s vote while another is in hvd.allreduce is an error on
both, naming what each was in, not two ranks waiting forever on two communicators; a rank
that joined (hvd.join()) votes zeros; a rank that left fails the others' next call. Values
are summed (or max/min) as float64 on the engine's communicator; objects go pickled as
before, and are refused while a rank has joined (as Horovod refuses broadcasts then).

Cross-rank invariant: as ControlPlane's, every method is collective (its engine operation
is submitted by every rank in the same order); a caller blocks until its operation ran.
"""
from __future__ import annotations

import numpy as np

from ..control import _OPS, ControlPlane
from .engine import Operation


class _ControlOp(Operation):
    """One control-plane call: `run(comm)` moves it; `spec`, where a joined rank can take
    part with zeros (join_ops.py): the values' allreduces and the barrier."""

    channel = "control"

    def __init__(self, kind, run, fields=(), spec=None, nbytes=0):
        super().__init__("control", auto_named=False)
        self.kind, self._run, self._fields = kind, run, list(fields)
        self._spec, self._nbytes = spec, nbytes

    def fields(self):
        return self._fields

    def nbytes(self):
        return self._nbytes

    def layout(self):
        return (type(self), self.kind, *self._fields)

    def join_spec(self):
        return None if self._spec is None else self.joins_as(*self._spec)

    def run(self, comm):
        return self._run(comm)


class EngineControlPlane(ControlPlane):
    def __init__(self, comm, engine):
        """comm: a communicator of the script's ranks, kept for abort(); engine: the
        runtime's collective engine, which carries every call."""
        super().__init__(comm)
        self.engine = engine

    def _call(self, op):
        return self.engine.call(op)

    def allreduce(self, values, op: str = "sum") -> np.ndarray:
        out = np.array(values, dtype=np.float64, copy=True).reshape(-1)
        mpi_op = _OPS[op]

        def run(comm):
            comm.Allreduce(self._MPI.IN_PLACE, out, op=getattr(self._MPI, mpi_op))
            return out
        return self._call(_ControlOp(f"allreduce-{op}", run, [len(out)],
                                     ("values", len(out), mpi_op), out.nbytes))

    def broadcast(self, obj, root: int = 0):
        return self._call(_ControlOp("broadcast", lambda comm: comm.bcast(obj, root=root),
                                     [f"root {root}"]))

    def gather(self, obj, root: int = 0):
        return self._call(_ControlOp("gather", lambda comm: comm.gather(obj, root=root),
                                     [f"root {root}"]))

    def allgather(self, obj) -> list:
        return self._call(_ControlOp("allgather", lambda comm: comm.allgather(obj)))

    def barrier(self) -> None:
        # the round waits idly (sleeping between tests) until every rank is there
        self._call(_ControlOp("barrier", lambda comm: None, spec=("barrier",)))

    def _reports(self, report) -> list:
        return self._call(_ControlOp("agree", lambda comm: comm.allgather(report)))
