"""Leaving is an event: a rank that ends tells the others, so no rank waits for it forever.

A rank ends normally when its script returns or calls sys.exit, when it calls
hvd.shutdown(), when hpcaccel.train ends, or when an uncaught exception ends it (before the
job is aborted). Before MPI is finalized it sends every other rank of its job one small
notice on a communicator reserved for notices: why it ends, and how many collectives it has
entered on each channel since the notices were set up. Every wait for a collective (the
control plane's, the reducer's bucket waits, hpcaccel.torch's agreement rounds) checks for
notices while it waits (`check`) and fails with `PeerLeft`, naming the rank, when a rank
that left never entered the collective this rank waits in.

Cross-rank invariants:
  * Counts: every rank enters the same collectives of a channel in the same order, so a
    rank that left after entering n collectives of channel c took part in (and completed)
    collectives 1..n of c: a peer waiting in collective k <= n will see it complete, and
    one waiting in k > n never will and fails. No timeout: a normal end, where every rank
    leaves after its last collective, never fails a peer's last collective.
  * A rank sends its notice once, when it ends (its counts are final), after what it
    submitted has run (hvd.shutdown() finishes queued operations first).
  * The notices' communicator is never freed: a notice a peer never received stays there
    unmatched and can never match a later communicator's traffic.

Waiting for a notice costs nothing: a receive is posted once and tested only while a rank
waits for a collective that has not completed yet.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from .collectives import TRACKER

# channels whose collectives ranks count alike: collectives.CHANNELS, and hpcaccel.torch's
# agreement rounds (every rank, joined or not, takes part in every round)
CHANNELS = ("control", "gradients", "collectives", "rounds")
REASONS = ("its process ended (the script returned or called sys.exit)",
           "it called hvd.shutdown()",
           "hpcaccel.train ended on it",
           "it failed with an uncaught exception")
_TAG = 29


class PeerLeft(RuntimeError):
    """A rank this one waits for in a collective has left the job."""


class Departures:
    """The notices of one job (the ranks of `comm`). Collective to make (duplicates comm)."""

    def __init__(self, comm, counts=None):
        """counts: () -> {channel: count} of the collectives this rank entered so far
        (default: the tracker's, collectives.TRACKER); counts are taken relative to the
        moment of construction, when every rank is at the same point."""
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm.Dup()  # never freed: see the module's invariants
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._counts = counts or (lambda: dict(TRACKER.seq))
        self._base = self._read_counts()
        self.left: dict[int, tuple[str, np.ndarray]] = {}  # rank -> (why, counts)
        self._lock = threading.Lock()
        self._buf = np.zeros(1 + len(CHANNELS), dtype=np.int64)
        self._status = MPI.Status()
        self._request = self._post() if self.size > 1 else None
        self.announced = False

    def _read_counts(self) -> np.ndarray:
        got = self._counts()
        return np.array([got.get(c, 0) for c in CHANNELS], dtype=np.int64)

    def _post(self):
        return self.comm.Irecv(self._buf, source=self._MPI.ANY_SOURCE, tag=_TAG)

    def poll(self) -> None:
        """Local. Take in the notices that arrived."""
        with self._lock:
            while self._request is not None and self._request.Test(self._status):
                source = self._status.Get_source()
                why = int(self._buf[0])
                self.left[source] = (REASONS[why] if 0 <= why < len(REASONS) else "it ended",
                                     self._buf[1:].copy())
                self._request = self._post() if len(self.left) < self.size - 1 else None

    def check(self, channel: str, seq: int, waits_in: str = "") -> None:
        """Local. PeerLeft if a rank that left never entered collective `seq` (a count as
        `counts` gives it, not relative) of `channel`, which this rank waits in."""
        self.poll()
        if not self.left:
            return
        i = CHANNELS.index(channel)
        mine = seq - int(self._base[i])
        gone = sorted(r for r, (_, counts) in self.left.items() if counts[i] < mine)
        if gone:
            r = gone[0]
            why, counts = self.left[r]
            more = f" (and rank(s) {gone[1:8]})" if len(gone) > 1 else ""
            raise PeerLeft(f"rank {r}{more} left the job: {why}, after {counts[i]} {channel} "
                           f"collective(s); this rank waits in {channel} collective "
                           f"#{mine}{' (' + waits_in + ')' if waits_in else ''}, which rank "
                           f"{r} never entered: the ranks ran different numbers of "
                           f"collectives")

    def announce(self, reason: int, wait: float = 2.0) -> None:
        """Local. Tell every other rank that this one ends, with its final counts; once.
        Waits at most `wait` seconds for the sends (small messages complete at once)."""
        with self._lock:
            if self.announced or self.size == 1:
                self.announced = True
                return
            self.announced = True
            notice = np.concatenate([[reason], self._read_counts() - self._base]).astype(np.int64)
            sends = [self.comm.Isend(notice, dest=r, tag=_TAG)
                     for r in range(self.size) if r != self.rank]
            deadline = time.monotonic() + wait
            while not self._MPI.Request.Testall(sends):
                if time.monotonic() > deadline:
                    abandon(sends, notice)  # a peer gone or stuck: do not wait for it
                    break
                time.sleep(0.001)
            if self._request is not None:  # no receive may stay posted into MPI_Finalize
                self._request.Cancel()
                self._request.Wait()
                self._request = None


_current: Departures | None = None


def install(departures: Departures | None) -> None:
    """Local. The notices waits in this process check (None: none)."""
    global _current
    _current = departures


def current() -> Departures | None:
    return _current


def check(channel: str, seq: int, waits_in: str = "") -> None:
    """Local. Departures.check on the installed notices; nothing when none are installed."""
    d = _current
    if d is not None:
        d.check(channel, seq, waits_in)


def announce(reason: int) -> None:
    """Local. Departures.announce on the installed notices, if any."""
    d = _current
    if d is not None:
        d.announce(reason)


_abandoned: list = []


def abandon(request, buffer) -> None:
    """Local. A request a failed wait leaves behind, with the memory MPI may still write
    into: kept for the rest of the process (were it freed, a late completion would write
    into memory Python reuses)."""
    _abandoned.append((request, buffer))


def wait_request(request, channel: str, seq: int, waits_in: str = "", buffer=None,
                 spin: float = 0.002) -> None:
    """Wait for an MPI request of collective `seq` of `channel`: spin briefly (the latency of
    a collective whose peers are there already), then sleep, backing off to 10 ms, so a
    rank that waits for a slow peer leaves the core to it; check the notices meanwhile.
    buffer: the request's memory, kept (abandon) if the wait fails."""
    t0 = time.perf_counter()
    while not request.Test():
        if time.perf_counter() - t0 > spin:
            break
    else:
        return
    pause = 1e-4
    while not request.Test():
        try:
            check(channel, seq, waits_in)
        except PeerLeft:
            abandon(request, buffer)
            raise
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
