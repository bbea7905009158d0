"""The collective engine behind hpcaccel.torch's allreduce/allgather/broadcast: operations
run in the background, one at a time, in the order this rank submitted them; a handle
(an int, as Horovod's) answers poll() and synchronize().

Horovod matches operations across ranks by name in a coordinator. Here each operation
first agrees on what it is: one small allreduce of its descriptor (kind, name, dtype,
shape, op, root) as MAX of (d, -d), which equals (d, -d) on every rank exactly when all
ranks sent the same d. If any rank differs, every rank learns it from that same result,
they all gather the readable descriptions and all fail the operation with one message
naming the ranks; nothing is summed. So a mismatch is an error on every rank, never a hang
inside a data collective and never silently mixed data. What the check costs per call is
measured in benchmarks/test_torch_api.py.

Cross-rank invariants:
  * Every rank submits the same operations in the same order (as MPI requires; Horovod
    allowed any order of names). A different order is reported as a mismatch.
  * One thread (the engine's) calls MPI on the engine's communicator, a duplicate that no
    other part uses; so the engine never interferes with the reducer or the control plane.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
import zlib

import numpy as np

from ..collectives import TRACKER

DESCRIPTOR_LEN = 16


def descriptor(kind: str, name: str, fields: list) -> np.ndarray:
    """Fixed-length int64 fingerprint of an operation; equal on two ranks iff they agree
    on kind, name and `fields` (dtype names, shapes, op, root, factors as strings/ints)."""
    d = np.zeros(DESCRIPTOR_LEN, dtype=np.int64)
    d[0] = zlib.crc32(kind.encode())
    d[1] = zlib.crc32(name.encode())
    d[2] = zlib.crc32(repr(fields).encode())
    d[3] = len(fields)
    return d


class Operation:
    """One collective: `run(comm)` does the data movement and returns the result; `kind`,
    `name` and `fields()` describe it for the agreement check (what must match)."""

    kind = "?"

    def __init__(self, name: str):
        self.name = name

    def fields(self) -> list:
        return []

    def describe(self) -> str:
        return f"{self.kind} {self.name!r} ({', '.join(map(str, self.fields()))})"

    def agree(self, comm, stall):
        """Collective. None when every rank submitted the same operation, else the message.
        `stall`: a StallCheck, told while this rank waits for the others to arrive."""
        from mpi4py import MPI

        d = descriptor(self.kind, self.name, self.fields())
        both = np.concatenate([d, -d])
        stall.wait(comm.Iallreduce(MPI.IN_PLACE, both, op=MPI.MAX), self)
        if np.array_equal(both[:DESCRIPTOR_LEN], d) and np.array_equal(both[DESCRIPTOR_LEN:], -d):
            return None
        return mismatch_message(comm.allgather(self.describe()))

    def run(self, comm):
        raise NotImplementedError


def mismatch_message(descriptions: list[str]) -> str:
    """Every rank's description grouped: which ranks asked for what."""
    groups: dict[str, list[int]] = {}
    for r, text in enumerate(descriptions):
        groups.setdefault(text, []).append(r)
    parts = [f"rank(s) {_ranks(ranks)}: {text}" for text, ranks in groups.items()]
    return ("ranks disagree about a collective (all ranks must call the same operations in "
            "the same order, with the same names, dtypes, shapes, op and root): " + "; ".join(parts))


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:8]))
    return shown + (f" (+{len(ranks) - 8} more)" if len(ranks) > 8 else "")


class StallCheck:
    """Waiting for peers to submit the same operation, as Horovod's stall check does:
    after HOROVOD_STALL_CHECK_TIME_SECONDS (60) a warning names the operation this rank
    waits in (ranks that print nothing are the ones missing); after
    HOROVOD_STALL_SHUTDOWN_TIME_SECONDS (0: never) every rank of the job is ended.
    HOROVOD_STALL_CHECK_DISABLE=1 turns the warning off.

    Waits spin briefly (latency of a call whose peers are already there), then sleep,
    backing off to 10 ms, so a rank waiting for a slow peer leaves the core to it."""

    SPIN_SECONDS = 0.002

    def __init__(self, rank: int, environ=None):
        import os

        env = os.environ if environ is None else environ
        self.rank = rank
        self.warn_after = (None if env.get("HOROVOD_STALL_CHECK_DISABLE", "0") not in ("", "0")
                           else float(env.get("HOROVOD_STALL_CHECK_TIME_SECONDS", 60)))
        self.shutdown_after = float(env.get("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", 0)) or None

    def wait(self, request, op) -> None:
        import sys

        t0 = time.perf_counter()
        while not request.Test():
            if time.perf_counter() - t0 > self.SPIN_SECONDS:
                break
        else:
            return
        pause, warned = 1e-4, False
        while not request.Test():
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
            waited = time.perf_counter() - t0
            if self.warn_after is not None and not warned and waited > self.warn_after:
                warned = True
                print(f"hpcaccel.torch: rank {self.rank} has waited {waited:.0f} s in "
                      f"{op.describe()} for ranks that have not submitted it (they are stalled "
                      f"or skipped it)", file=sys.stderr, flush=True)
            if self.shutdown_after is not None and waited > self.shutdown_after:
                print(f"hpcaccel.torch: rank {self.rank}: stalled {waited:.0f} s in "
                      f"{op.describe()}; ending every rank (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS)",
                      file=sys.stderr, flush=True)
                from mpi4py import MPI
                MPI.COMM_WORLD.Abort(1)


class _Job:
    __slots__ = ("op", "done", "result", "error")

    def __init__(self, op):
        self.op, self.done, self.result, self.error = op, threading.Event(), None, None


class Engine:
    def __init__(self, comm):
        """comm: a communicator the engine owns (freed by close())."""
        self.comm = comm
        self.timeline = None
        self._jobs: dict[int, _Job] = {}
        self._ids = itertools.count(1)
        self._stall = StallCheck(comm.Get_rank())
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="hpcaccel-collectives",
                                        daemon=True)
        self._thread.start()
        self._auto_count = 0
        self._algorithm = None

    def algorithm(self):
        """The allreduce algorithm for the engine's communicator (hpcaccel's choice: the
        library's allreduce in slices on one host, ring or node-aware across hosts). Made
        on first use, in the engine thread: collective, and every rank's first reduction is
        the same operation."""
        if self._algorithm is None:
            from ..comm.allreduce_choice import make_algorithm
            self._algorithm = make_algorithm(self.comm, "auto")
        return self._algorithm

    def auto_name(self, kind: str) -> str:
        """A generated name, numbered in call order over all kinds (equal across ranks when
        the calls are; one counter, so ranks that disagreed about a kind once agree again
        on the next call)."""
        self._auto_count += 1
        return f"{kind}.noname.{self._auto_count}"

    def submit(self, op: Operation) -> int:
        handle = next(self._ids)
        job = _Job(op)
        self._jobs[handle] = job
        self._queue.put(job)
        return handle

    def poll(self, handle: int) -> bool:
        job = self._jobs.get(handle)
        return job is None or job.done.is_set()

    def wait(self, handle: int):
        """The operation's result; HorovodInternalError on every rank if it failed. An
        unknown (already synchronized) handle gives None, as in Horovod."""
        from .basics import HorovodInternalError

        job = self._jobs.get(handle)
        if job is None:
            return None
        while not job.done.wait(0.5):
            if not self._thread.is_alive():
                raise HorovodInternalError("hpcaccel.torch's collective thread has stopped")
        del self._jobs[handle]
        if job.error is not None:
            raise HorovodInternalError(job.error) from None
        return job.result

    def _serve(self):
        while True:
            job = self._queue.get()
            if job is None:
                return
            op = job.op
            TRACKER.enter(op.kind, 0, "collectives")
            t0 = time.perf_counter()
            try:
                problem = op.agree(self.comm, self._stall)
                if problem is not None:
                    job.error = problem
                else:
                    job.result = op.run(self.comm)
            except Exception as e:  # noqa: BLE001 - reported by synchronize() on this rank
                job.error = f"{op.kind} {op.name!r} failed: {type(e).__name__}: {e}"
            finally:
                TRACKER.leave("collectives")
                if self.timeline is not None:
                    self.timeline.add(op.kind, t0, time.perf_counter(), name=op.name)
                job.done.set()

    def close(self):
        """Finish what was submitted, stop the thread, free the communicator. Local."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._algorithm is not None:
            getattr(self._algorithm, "close", lambda: None)()
        if self.comm is not None:
            self.comm.Free()
            self.comm = None
