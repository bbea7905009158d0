"""Stall watchdog: a rank that makes no progress for `timeout` seconds ends the whole job.

MPI collectives block forever when a peer dies or hangs; no error ever reaches the waiting
ranks. Each rank therefore runs a daemon thread that the loop feeds after every step
(`beat`). If the beats stop, the thread reports this rank's last completed step and aborts
the job (MPI_Abort ends every rank under mpirun and srun; os._exit backs it up).
"""
from __future__ import annotations

import os
import sys
import threading
import time

from .collectives import TRACKER


class Watchdog:
    def __init__(self, timeout: float, rank: int, abort, poll: float | None = None,
                 report=None):
        """report: called as report(phase, step) when the watchdog fires, before the abort
        (hang_report.HangReport: which collective this rank is in, and who is to blame)."""
        self.timeout, self.rank, self._abort, self._report = timeout, rank, abort, report
        self._poll = poll or min(1.0, timeout / 10)
        self._last = time.monotonic()
        self._what = "set-up"
        self._step = 0
        self._stopped = threading.Event()
        self._thread = None

    def start(self) -> "Watchdog":
        if self.timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="hpcaccel-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, step: int, what: str = "training") -> None:
        """Called by the loop: `step` steps are complete; `what` is the phase now starting."""
        self._last, self._step, self._what = time.monotonic(), step, what
        TRACKER.step = step

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(self._poll):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                sys.stderr.write(
                    f"hpcaccel: rank {self.rank}: no progress for {idle:.0f} s in {self._what} "
                    f"after step {self._step} (--stall-timeout {self.timeout:g}); a peer rank "
                    f"has probably died or hung. Aborting the job.\n")
                sys.stderr.flush()
                if self._report is not None:
                    try:
                        where = self._report(self._what, self._step)
                        sys.stderr.write(f"hpcaccel: rank {self.rank}: {where}\n")
                        sys.stderr.flush()
                    except Exception as e:  # noqa: BLE001 - the abort must happen regardless
                        sys.stderr.write(f"hpcaccel: rank {self.rank}: hang report failed: {e}\n")
                threading.Timer(10.0, os._exit, args=(1,)).start()  # if abort itself hangs
                self._abort()
                os._exit(1)


def start_watchdog(timeout: float, out: str, rank: int, size: int, abort) -> Watchdog:
    """The stall watchdog of a training run, started, with the hang report: when it fires
    it writes OUT/hang-report/rank-N.txt, waits half the timeout (2-5 s) for the other
    ranks' reports, and the lowest reporting rank names who holds the job up
    (hang_report.py). What hpcaccel.train and a script's hpcaccel.torch.Job both run.
    timeout 0: nothing is watched."""
    from .hang_report import HangReport
    from .runlock import release_held

    def release_then_abort():
        release_held()  # MPI_Abort skips exit handlers: OUT's lock would stay behind
        abort()

    report = HangReport(out, rank, size, grace=min(5.0, max(2.0, timeout / 2)))
    return Watchdog(timeout, rank, abort=release_then_abort, report=report).start()
