"""The job's control plane: small decisions and values shared by all ranks, over the job's
mpi4py communicator. The Reducer averages gradients; everything else that ranks exchange
(votes, metric means, gathers to rank 0, barriers, "fail everywhere if any rank failed")
goes through here, whichever backend averages the gradients.

Why mpi4py and not the backend: Horovod's object collectives each wait for a background
cycle and Horovod has no gather to one rank; every backend runs on this communicator anyway.

Cross-rank invariants:
  * Every method is collective unless marked local: all ranks call the same methods in the
    same order, with values of the same length.
  * The training thread calls these only between steps (after Reducer.synchronize()), never
    while a step's gradient allreduces are in flight on a communication thread.

Waiting for peers that do long work alone (rank 0 writing a checkpoint, a host's local rank
0 staging data, packing built-in data) is done idly in barrier() and agree(): MPI's blocking
collectives poll at 100% CPU, which on a node whose ranks share cores takes the CPU from the
one rank doing the work.

Every wait checks for departures (departure.py): a rank that has ended never enters the
collective others wait in, and they fail naming it (PeerLeft) instead of waiting forever.
So the values go by nonblocking MPI_Iallreduce, and the object collectives (pickled, which
have no nonblocking form) start only after a barrier waited for that way: past it, every
rank is in the same collective.
"""
from __future__ import annotations

import time

import numpy as np

from .collectives import TRACKER
from .departure import PeerLeft, abandon, check, wait_request
from .errors import SetupFailed, UsageError

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


class ControlPlane:
    def __init__(self, comm=None):
        """comm: the job's mpi4py communicator (default COMM_WORLD)."""
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.is_main = self.rank == 0

    # -- values -----------------------------------------------------------------------------
    def allreduce(self, values, op: str = "sum") -> np.ndarray:
        """Reduce a few numbers over ranks (op: sum, max, min) as float64; a new array."""
        out = np.array(values, dtype=np.float64, copy=True).reshape(-1)
        with TRACKER.track(f"allreduce-{op}", out.nbytes):
            request = self.comm.Iallreduce(self._MPI.IN_PLACE, out, op=getattr(self._MPI, _OPS[op]))
            wait_request(request, "control", TRACKER.seq["control"], f"allreduce-{op}", out)
        return out

    def mean(self, *values: float) -> list[float]:
        """Average scalars over ranks (metrics)."""
        return [float(v) for v in self.allreduce(values) / self.size]

    def any(self, flag: bool) -> bool:
        """Did any rank vote True? The same answer on every rank."""
        return bool(self.allreduce([1.0 if flag else 0.0], "max")[0])

    # -- objects (small, pickled) --------------------------------------------------------
    def broadcast(self, obj, root: int = 0):
        """`root`'s object on every rank."""
        with TRACKER.track("broadcast"):
            self._arrive()
            return self.comm.bcast(obj, root=root)

    def gather(self, obj, root: int = 0) -> list | None:
        """Every rank's object, as a list by rank on `root`; None elsewhere."""
        with TRACKER.track("gather"):
            self._arrive()
            return self.comm.gather(obj, root=root)

    def allgather(self, obj) -> list:
        """Every rank's object, as a list by rank, on every rank."""
        with TRACKER.track("allgather"):
            self._arrive()
            return self.comm.allgather(obj)

    def barrier(self) -> None:
        with TRACKER.track("barrier"):
            self._idle_barrier()

    def _idle_barrier(self) -> None:
        """A barrier that sleeps while it waits (backing off from 0.1 to 20 ms between
        tests), so a waiting rank leaves its core to the ranks still working."""
        request, pause = self.comm.Ibarrier(), 1e-4
        seq = TRACKER.seq["control"]
        while not request.Test():
            try:
                check("control", seq, "barrier")
            except PeerLeft:
                abandon(request, None)
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def _arrive(self) -> None:
        """Every rank is in this (object) collective, or a departure fails it here."""
        if self.size > 1:
            wait_request(self.comm.Ibarrier(), "control", TRACKER.seq["control"], "arriving")

    # -- failing together -----------------------------------------------------------------
    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed; the lowest failing rank's error is the one
        reported: a UsageError as itself (exit 2), anything else as SetupFailed."""
        report = None if error is None else (
            isinstance(error, UsageError), f"{type(error).__name__}: {error}", str(error))
        reports = self._reports(report)
        failed = [(r, m) for r, m in enumerate(reports) if m is not None]
        if failed:
            rank, (usage, described, text) = failed[0]
            raise UsageError(text) if usage else SetupFailed(f"rank {rank}: {described}")

    def _reports(self, report) -> list:
        """Every rank's report, once every rank is there."""
        with TRACKER.track("agree"):
            self._idle_barrier()  # peers may still be working: wait without spinning
            return self.comm.allgather(report)

    def collectively(self, fn, *args, **kwargs):
        """Run `fn` on every rank; if it fails on any rank, it fails on all (agree)."""
        result, error = None, None
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported collectively
            error = e
        self.agree(error)
        return result

    def abort(self, code: int = 1) -> None:
        """Local call, global effect: end every rank of the job (MPI_Abort)."""
        self.comm.Abort(code)
