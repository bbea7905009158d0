"""The collective engine behind hpcaccel.torch: operations run one at a time, in the order
this rank submitted them; a handle (an int, as Horovod's) answers poll() and synchronize().
A submitted operation runs in the engine's thread, unless the thread that waits for it
(synchronize()) finds the engine idle first: then it runs what is queued up to it itself,
in order, sparing the hand-off to the engine's thread and back. A blocking call (call())
runs in the calling thread when nothing is queued.

Each operation first agrees with the other ranks on what it is, in one small allreduce
(agreement.py: a mismatch is an error on every rank, never a hang inside a data collective
and never silently mixed data; ranks that called hvd.join() take part with zeros). What the
check costs per call is measured by benchmarks/torch_api/allreduce_calls.py.

Cross-rank invariants:
  * Every rank submits the same operations in the same order (as MPI requires; Horovod
    allowed any order of names). A different order is reported as a mismatch.
  * One thread at a time (whichever holds the engine's lock: its own thread, a blocking
    caller's or a waiting one's) calls MPI on the engine's communicator, a duplicate that
    no other part uses; so the engine never interferes with the reducer's communicators.
  * While it waits for a round, the engine checks for ranks that left the job
    (departure.py): a rank that ended fails the others' next round, naming it.
"""
from __future__ import annotations

import collections
import itertools
import os
import queue
import re
import sys
import threading
import time

from ..collectives import TRACKER
from ..departure import PeerLeft, abandon, check
from .agreement import Rounds, descriptor, fields_hash, fingerprint
from .errors import HorovodInternalError

_AUTO_NAME = re.compile(r"\.noname\.\d+$")


class Operation:
    """One collective: `run(comm)` does the data movement and returns the result; `kind`,
    `name` and `fields()` describe it for the agreement (what must match). `channel`: the
    hang report's (collectives.py) it counts on; None: not counted."""

    kind = "?"
    channel = "collectives"

    def __init__(self, name: str, auto_named: bool | None = None):
        """auto_named: whether `name` was generated (Engine.auto_name); None: tell by it."""
        self.name = name
        self.auto_named = bool(_AUTO_NAME.search(name)) if auto_named is None else auto_named

    def fields(self) -> list:
        return []

    def layout(self):
        """A hashable key equal for two operations of this kind exactly when their fields()
        are (so the fields' hash is made once per layout: agreement.fields_hash); None:
        made every time."""
        return None

    def nbytes(self) -> int:
        """The bytes it moves from this rank, for the hang report."""
        return sum(t.numel() * t.element_size() for t in getattr(self, "inputs", ()))

    def describe(self) -> str:
        return f"{self.kind} {self.name!r} ({', '.join(map(str, self.fields()))})"

    def descriptor(self) -> bytes:
        """The fingerprint every rank's must equal (agreement.py)."""
        key = self.layout()
        if key is None:
            return descriptor(self.kind, self.name, self.fields())
        return fingerprint(fields_hash(self.kind, key, self.fields), self.name)

    def after_agree(self, comm) -> str | None:
        """Collective, after every rank agreed (none joined): what else ranks must know
        before run() (allgather's first dimensions); an error message, or None."""
        return None

    def join_spec(self):
        """What a rank that joined needs to take part with zeros (join_ops.py), or None where
        the operation cannot run while ranks have joined (Horovod refuses it too)."""
        return None

    def joins_as(self, key: str, *args) -> tuple:
        """A join spec: a joined rank takes part as join_ops.take_part's `key` runner does,
        with `args`, counting on this operation's channel."""
        return (key, self.kind, self.channel, self.auto_named, args)

    def run(self, comm):
        raise NotImplementedError


class JoinOp(Operation):
    """hvd.join(): take part in the others' operations with zeros until every rank joined.
    take_part(spec, engine): runs the operation a join spec describes, with zeros."""

    kind = "join"

    def __init__(self, take_part):
        super().__init__("join", auto_named=False)
        self.take_part = take_part


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
        env = os.environ if environ is None else environ
        self.rank = rank
        self.warn_after = (None if env.get("HOROVOD_STALL_CHECK_DISABLE", "0") not in ("", "0")
                           else float(env.get("HOROVOD_STALL_CHECK_TIME_SECONDS", 60)))
        self.shutdown_after = float(env.get("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", 0)) or None

    def wait(self, request, what, round_: int, buffer=None) -> None:
        """Wait for agreement round `round_`'s request (on `buffer`); fails (PeerLeft) where a
        rank that left the job never entered it. what: the operation's description, or a
        function making it (made only where a message needs it)."""
        t0 = time.perf_counter()
        while not request.Test():
            if time.perf_counter() - t0 > self.SPIN_SECONDS:
                break
        else:
            return
        pause, warned = 1e-4, False
        if callable(what):
            what = what()
        while not request.Test():
            try:
                check("rounds", round_, what)
                time.sleep(pause)  # a signal handler's exception may end the wait here too
            except BaseException:
                abandon(request, buffer)
                raise
            pause = min(pause * 2, 0.01)
            waited = time.perf_counter() - t0
            if self.warn_after is not None and not warned and waited > self.warn_after:
                warned = True
                print(f"hpcaccel.torch: rank {self.rank} has waited {waited:.0f} s in "
                      f"{what} for ranks that have not submitted it (they are stalled "
                      f"or skipped it)", file=sys.stderr, flush=True)
            if self.shutdown_after is not None and waited > self.shutdown_after:
                print(f"hpcaccel.torch: rank {self.rank}: stalled {waited:.0f} s in "
                      f"{what}; ending every rank (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS)",
                      file=sys.stderr, flush=True)
                from mpi4py import MPI
                MPI.COMM_WORLD.Abort(1)


class _Job:
    """A submitted operation: its result or error once `finished` (then `_done` is
    released; waiters acquire and release it)."""

    __slots__ = ("op", "finished", "result", "error", "_done")

    def __init__(self, op):
        self.op, self.finished, self.result, self.error = op, False, None, None
        self._done = threading.Lock()
        self._done.acquire()

    def finish(self, result, error) -> None:
        self.result, self.error, self.finished = result, error, True
        self._done.release()

    def wait(self, timeout: float) -> bool:
        if self._done.acquire(timeout=timeout):
            self._done.release()
            return True
        return False


class Engine:
    def __init__(self, comm):
        """comm: a communicator the engine owns (freed by close())."""
        self.comm = comm
        self.timeline = None
        self._jobs: dict[int, _Job] = {}
        self._ids = itertools.count(1)
        self.rounds = Rounds(comm, StallCheck(comm.Get_rank()))
        self._queue: collections.deque = collections.deque()  # submitted, not yet started
        self._wake: queue.SimpleQueue = queue.SimpleQueue()  # one token per submit; None: stop
        self._thread = threading.Thread(target=self._serve, name="hpcaccel-collectives",
                                        daemon=True)
        self._thread.start()
        self._auto_count = 0
        self._algorithm = None
        self._busy = threading.Lock()   # held while operations are taken and run, any thread
        self._pending = 0               # submitted and not yet done
        self._counting = threading.Lock()
        self._broken = None  # why no operation can run any more (one was interrupted here)

    def algorithm(self):
        """The allreduce algorithm for the engine's communicator (hpcaccel's choice: the
        library's allreduce in slices on one host, ring or node-aware across hosts). Made
        on first use, by whichever thread runs that operation: collective, and every rank's
        first reduction is the same operation."""
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
        with self._counting:
            self._pending += 1
            self._queue.append(job)
        self._wake.put(True)
        return handle

    def _idle(self) -> bool:
        """Take the engine if nothing submitted is queued or running (then release _busy)."""
        with self._counting:
            return self._pending == 0 and self._busy.acquire(blocking=False)

    def call(self, op: Operation):
        """Run `op` now and return its result (HorovodInternalError if it failed): in the
        calling thread when nothing submitted is queued or running (no hand-off to the
        engine's thread and back), else after what was submitted. Either way in
        submission order, one operation at a time on the engine's communicator."""
        if not self._idle():
            return self.wait(self.submit(op))
        try:
            result, error = self._execute(op)
        finally:
            self._busy.release()
        if error is not None:
            raise HorovodInternalError(error) from None
        return result

    def post(self, op: Operation) -> None:
        """Start `op`'s round and leave it pending (agreement.Rounds.post: an operation that
        needs nothing from its outcome, read by the next round or close()), in the calling
        thread when the engine is idle; else agree on it in turn (call). Raises the
        previous pending round's error (HorovodInternalError)."""
        if not self._inline(lambda: self.rounds.post(op), op):
            self.call(op)

    def _inline(self, step, op) -> bool:
        """Run step() (-> an error message or None) holding the engine, if it is idle;
        whether it ran. Raises HorovodInternalError with the message."""
        if not self._idle():
            return False
        try:
            problem = step()
        except PeerLeft as e:
            problem = self._left(op, e)
        finally:
            self._busy.release()
        if problem is not None:
            raise HorovodInternalError(problem) from None
        return True

    @staticmethod
    def _left(op, e) -> str:
        what = f"{op.kind} {op.name!r}: " if op is not None else ""
        return (f"{what}{e} (uneven data per rank? a rank that runs out of batches calls "
                f"hvd.join())")

    def poll(self, handle: int) -> bool:
        job = self._jobs.get(handle)
        return job is None or job.finished

    def wait(self, handle: int):
        """The operation's result; HorovodInternalError on every rank if it failed. An
        unknown (already synchronized) handle gives None, as in Horovod. Where the engine
        is idle (its thread has not taken the operation yet), runs what is queued up to
        and including it in this thread, in order."""
        job = self._jobs.get(handle)
        if job is None:
            return None
        if not job.finished and self._busy.acquire(blocking=False):
            try:  # holding _busy: `job` is finished or still queued, behind what came first
                while not job.finished and self._run_next():
                    pass
            finally:
                self._busy.release()
        while not job.wait(0.5):
            if not self._thread.is_alive():
                raise HorovodInternalError("hpcaccel.torch's collective thread has stopped")
        del self._jobs[handle]
        if job.error is not None:
            raise HorovodInternalError(job.error) from None
        return job.result

    def _run_next(self) -> bool:
        """Holding _busy: run the first queued job, if any; whether there was one."""
        with self._counting:
            if not self._queue:
                return False
            job = self._queue.popleft()
        result, error = None, "interrupted"
        try:
            result, error = self._execute(job.op)
        finally:
            with self._counting:
                self._pending -= 1
            job.finish(result, error)
        return True

    def _serve(self):
        while self._wake.get() is not None:
            if not self._queue:
                continue  # a waiting thread took it already (checked again under _busy)
            with self._busy:
                self._run_next()

    def _execute(self, op) -> tuple:
        """Agree on `op` with the other ranks and run it (or, for join, take part in
        theirs): (result, None), or (None, error message). Holding self._busy."""
        if self._broken is not None:
            return None, self._broken
        channel = op.channel
        if channel is not None:
            TRACKER.enter(op.kind, op.nbytes(), channel)
        t0 = time.perf_counter()
        result = error = None
        try:
            if isinstance(op, JoinOp):
                result = self.rounds.join(lambda spec: op.take_part(spec, self))
            else:
                error = self.rounds.agree(op)
                if error is None:
                    result = op.run(self.comm)
        except PeerLeft as e:
            error = self._left(op, e)
        except Exception as e:  # noqa: BLE001 - reported by synchronize() on this rank
            error = f"{op.kind} {op.name!r} failed: {type(e).__name__}: {e}"
        except BaseException as e:  # Ctrl-C or a signal handler's exception, mid-operation
            # (run in a caller's thread): this rank left it half done, so the next one would
            # be matched against the peers' rest of it; none runs any more
            self._broken = (f"{op.kind} {op.name!r} was interrupted on this rank "
                            f"({type(e).__name__}); no later collective can match its peers'")
            raise
        finally:
            if channel is not None:
                TRACKER.leave(channel)
            if self.timeline is not None:
                self.timeline.add(op.kind, t0, time.perf_counter(), name=op.name)
        return result, error

    def close(self):
        """Finish what was submitted (a pending round too), stop the thread, free the
        communicator. Local."""
        if self._thread.is_alive():
            self._wake.put(None)
            self._thread.join()
        try:
            if self._broken is None:
                self.rounds.settle()  # the last step's exchange: its peers' rounds match it
        except PeerLeft:
            pass  # a rank that left: nothing to settle with
        if self._algorithm is not None:
            getattr(self._algorithm, "close", lambda: None)()
        if self.comm is not None:
            self.comm.Free()
            self.comm = None
