"""hvd.join() (Horovod 0.28.1): a rank that has run out of data takes part in the other
ranks' operations with zeros until every rank has joined.

The engine's agreement rounds (agreement.py) tell a joined rank what the others run; the
lowest rank that has not joined sends it the operation's `spec` (what a joined rank needs:
dtypes and shapes, the op, which DistributedOptimizer), and `take_part` runs the same
collective with zeros:

  allreduce, grouped_allreduce  zeros of the same dtypes and shapes, the same op and
                                factors: the others' Average divides by all ranks, as in
                                Horovod (joined ranks count, contributing zeros)
  control values                the votes and means of hvd.Job and DistributedOptimizer:
                                zeros (no stop signal, nothing new)
  barrier                       nothing to send
  gradient exchange             every bucket of that DistributedOptimizer's reducer, in
                                index order, as zeros with every "used" flag 0
                                (comm/joined.py): a parameter no other rank has a gradient
                                for stays without one

Cross-rank invariant: a joined rank runs exactly the MPI calls the others run for the
operation, in the same order on the same communicator, and counts it on the same channel
of collectives.TRACKER, so counts (hang report, departures) stay equal on every rank.
"""
from __future__ import annotations

import numpy as np
import torch

from ..collectives import TRACKER
from .engine import JoinOp


def join(device=-1) -> int:
    """This rank has run out of data (Horovod 0.28.1's join): until every rank has called
    join(), it takes part in the other ranks' allreduces (hvd.allreduce and grouped ones,
    DistributedOptimizer's gradients, Job's votes) with zeros, so they go on with their
    batches; an Average still divides by the number of all ranks, as Horovod's does.
    Allgather, broadcast, reducescatter and object collectives fail while a rank has
    joined (Horovod refuses them too). Blocks until every rank has joined; returns the rank
    that joined last (the same on every rank). device: accepted (zeros are made on the
    CPU). HorovodInternalError if a rank leaves the job meanwhile."""
    from .basics import runtime

    engine = runtime().engine
    return engine.wait(engine.submit(JoinOp(take_part)))


def take_part(spec_, engine) -> None:
    """Engine thread of a joined rank: run the operation `spec_` (Operation.joins_as)
    describes, with zeros."""
    key, kind, channel, auto_named, args = spec_
    if auto_named:
        engine.auto_name(kind)  # the others numbered a generated name: keep in step
    if channel is not None:
        TRACKER.enter(kind, 0, channel)
    try:
        _RUNNERS[key](engine, *args)
    finally:
        if channel is not None:
            TRACKER.leave(channel)


def _allreduce(engine, entries, op, prescale, postscale) -> None:
    from .collective_ops import AllreduceOp

    zeros = [torch.zeros(shape, dtype=getattr(torch, dtype.replace("torch.", "")))
             for dtype, shape in entries]
    AllreduceOp("join", zeros, zeros, op, prescale, postscale, single=False).run(engine.comm)


def _values(engine, n, op_name) -> None:
    from mpi4py import MPI

    engine.comm.Allreduce(MPI.IN_PLACE, np.zeros(n), op=getattr(MPI, op_name))


def _barrier(engine) -> None:
    pass  # the round itself was the barrier


def _exchange(engine, index) -> None:
    from ..comm.joined import zero_exchange
    from .basics import runtime

    zero_exchange(runtime().reducer(index))


_RUNNERS = {"allreduce": _allreduce, "values": _values, "barrier": _barrier,
            "exchange": _exchange}
