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

Ranks in different collectives (waitgraph.py) are told apart on the same communicator: a
rank whose main thread has waited in one collective for WAIT_NOTICE_AFTER seconds tells
every other rank still there what it waits in and its counts, and again while it waits, at
intervals growing from WAIT_NOTICE_EVERY to WAIT_NOTICE_MAX (a rank that waits minutes for
a slow peer sends a notice to each rank every few seconds, not a stream). A waiting rank
judges, at most every WAIT_JUDGE_EVERY seconds, the notices that have stayed the same for
WAIT_SETTLED seconds and are recent (within twice their sender's interval): where it belongs
to a set of waiting ranks that each wait for one of the set, no member can ever go on, and
each fails (`PeersDisagree`) naming the collectives, about two seconds after the last of
them began to wait. Only the main
thread's waits are told: a rank's other threads (the engine's, the reducer's) run what the
main thread submitted, so a main thread that waits is a rank that submits nothing new, and a
count still moving shows as a notice that changed.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from .collectives import TRACKER
from .waitgraph import Wait, describe, stuck

# channels whose collectives ranks count alike: collectives.CHANNELS, and hpcaccel.torch's
# agreement rounds (every rank, joined or not, takes part in every round)
CHANNELS = ("control", "gradients", "collectives", "rounds")
REASONS = ("its process ended (the script returned or called sys.exit)",
           "it called hvd.shutdown()",
           "hpcaccel.train ended on it",
           "it failed with an uncaught exception")
_TAG = 29
_LEFT, _WAITING = 0, 1
_HEAD = 4  # a notice: kind, (reason | channel), seq, resend interval in ms; counts; text
_TEXT_WORDS = 12  # a waiting notice's description: 96 bytes
WAIT_NOTICE_AFTER = 0.5  # seconds a main thread waits before telling the others
WAIT_NOTICE_EVERY = 0.5  # and again, while it waits: a quarter of the wait so far, from this
WAIT_NOTICE_MAX = 8.0    # ... up to this
WAIT_SETTLED = 1.0       # a notice judged once it stayed the same this long, and came again
                         # within twice its sender's interval (+ WAIT_SETTLED: delivery)
WAIT_JUDGE_EVERY = 0.25  # how often a waiting rank judges the notices (O(ranks^2))


class PeerLeft(RuntimeError):
    """A collective this rank waits in can never complete: a rank it waits for has left the
    job (or, PeersDisagree, waits in another collective for good)."""


class PeersDisagree(PeerLeft):
    """The ranks wait in different collectives, each for a rank that never enters its own
    (waitgraph.py): none of them can ever go on."""


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
        # rank -> (what it waits in, when that notice first came, until when it is recent)
        self.waiting: dict[int, tuple[Wait, float, float]] = {}
        self._mine = None   # the main thread's wait: [channel, seq, what, since, told, when,
                            # judged when]
        self._sends: list = []  # waiting notices in flight: (requests, buffer)
        self._lock = threading.Lock()
        self._buf = np.zeros(_HEAD + len(CHANNELS) + _TEXT_WORDS, dtype=np.int64)
        self._status = MPI.Status()
        self._request = self._post() if self.size > 1 else None
        self.announced = False

    def _read_counts(self) -> np.ndarray:
        got = self._counts()
        return np.array([got.get(c, 0) for c in CHANNELS], dtype=np.int64)

    def _post(self):
        return self.comm.Irecv(self._buf, source=self._MPI.ANY_SOURCE, tag=_TAG)

    def _notice(self, kind: int, a: int, b: int, counts: np.ndarray, text: str = "",
                every_ms: int = 0) -> np.ndarray:
        words = np.frombuffer(text.encode()[:8 * _TEXT_WORDS].ljust(8 * _TEXT_WORDS, b"\0"),
                              dtype=np.int64)
        return np.concatenate([[kind, a, b, every_ms], counts, words]).astype(np.int64)

    def poll(self) -> None:
        """Local. Take in the notices that arrived."""
        n = len(CHANNELS)
        with self._lock:
            while self._request is not None and self._request.Test(self._status):
                source = self._status.Get_source()
                kind, a, b, every_ms = map(int, self._buf[:_HEAD])
                counts = self._buf[_HEAD:_HEAD + n].copy()
                if kind == _LEFT:
                    self.left[source] = (REASONS[a] if 0 <= a < len(REASONS) else "it ended",
                                         counts)
                    self.waiting.pop(source, None)
                elif source not in self.left:
                    text = self._buf[_HEAD + n:].tobytes().rstrip(b"\0").decode(errors="replace")
                    wait = Wait(CHANNELS[a], b, text, dict(zip(CHANNELS, counts.tolist())))
                    now = time.monotonic()
                    old = self.waiting.get(source)
                    first = old[1] if old is not None and old[0] == wait else now
                    self.waiting[source] = (wait, first, now + 2 * every_ms / 1000 + WAIT_SETTLED)
                self._request = self._post() if len(self.left) < self.size - 1 else None
            self._sends = [(reqs, buf) for reqs, buf in self._sends
                           if not self._MPI.Request.Testall(reqs)]

    def check(self, channel: str, seq: int, waits_in: str = "") -> None:
        """Local. PeerLeft if a rank that left never entered collective `seq` (a count as
        `counts` gives it, not relative) of `channel`, which this rank waits in."""
        self.poll()
        i = CHANNELS.index(channel)
        mine = seq - int(self._base[i])
        with self._lock:
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
        if threading.current_thread() is threading.main_thread():
            self._waits_in(channel, seq, waits_in)

    def _waits_in(self, channel: str, seq: int, what: str) -> None:
        """The main thread waits in collective `seq` of `channel`: once it has waited long
        enough, tell the others (and again while it waits), and fail (PeersDisagree) where it
        is stuck for good with ranks in other collectives."""
        now = time.monotonic()
        mine = self._mine
        if mine is None or mine[0] != channel or mine[1] != seq:
            self._mine = mine = [channel, seq, what, now, None, 0.0, 0.0]
        waited = now - mine[3]
        if waited < WAIT_NOTICE_AFTER or self.size == 1:
            return
        counts = self._read_counts() - self._base
        wait = Wait(channel, seq - int(self._base[CHANNELS.index(channel)]), what,
                    dict(zip(CHANNELS, counts.tolist())))
        every = min(max(WAIT_NOTICE_EVERY, waited / 4), WAIT_NOTICE_MAX)
        if wait != mine[4] or now - mine[5] >= every:
            notice = self._notice(_WAITING, CHANNELS.index(channel), wait.seq, counts, what,
                                  int(every * 1000))
            with self._lock:
                self._sends.append(([self.comm.Isend(notice, dest=r, tag=_TAG)
                                     for r in range(self.size)
                                     if r != self.rank and r not in self.left], notice))
            mine[4], mine[5] = wait, now
        if waited < WAIT_NOTICE_AFTER + WAIT_SETTLED or now - mine[6] < WAIT_JUDGE_EVERY:
            return
        mine[6] = now
        with self._lock:
            notices = list(self.waiting.items())
        waits = {r: w for r, (w, first, recent_until) in notices
                 if now - first >= WAIT_SETTLED and now <= recent_until}
        waits[self.rank] = wait
        members = stuck(waits)
        if self.rank in members:
            raise PeersDisagree(describe(self.rank, waits, members))

    def announce(self, reason: int, wait: float = 2.0) -> None:
        """Local. Tell every other rank that this one ends, with its final counts; once.
        Waits at most `wait` seconds for the sends (small messages complete at once)."""
        with self._lock:
            if self.announced or self.size == 1:
                self.announced = True
                return
            self.announced = True
            notice = self._notice(_LEFT, reason, 0, self._read_counts() - self._base)
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
