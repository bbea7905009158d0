"""How the mpi reducer waits for its buckets: only while every peer can still come.

A bucket's allreduce runs on the communication thread (or as a nonblocking request); the
training thread waits for it in synchronize(). A peer that has left the job (departure.py)
never takes part, so while it waits the training thread checks for departures and fails
(PeerLeft, naming the rank) instead of waiting forever. hpcaccel.torch also agrees on each
step's exchange (`agree`, hpcaccel/torch/exchange.py): a peer in another collective fails
it. Once the buckets are done every rank was in the exchange, so the round only confirms
it: it is started then and its outcome read by the engine's next operation or the next
step's round, when it has long completed (so no rank waits for the slowest one's arrival:
measured 0.3 ms a step for a 16 MB gradient on two loaded cores). It is run while waiting where that wait has lasted
AGREE_AFTER_SECONDS (a peer may be elsewhere: its buckets would never come; earlier, the
round would compete with the buckets for the cores), and first where ranks have joined
(they take part in the buckets only after it). The allreduce that can never complete stays behind in
the communication thread; the reducer is then broken (close() does not wait for it).

Cross-rank invariant: bucket k of a step is gradients collective `b.seq` on every rank
(collectives.TRACKER counts bucket launches, and every rank launches every bucket of every
step in index order), so a departed rank's count says exactly whether it took part.
"""
from __future__ import annotations

import time

from ..departure import check

POLL_SECONDS = 0.02  # how often a waiting rank looks for departures (it wakes at once when done)
AGREE_AFTER_SECONDS = 0.25  # a wait this long may be a peer elsewhere: agree while waiting


class Once:
    """A step's agreement on its exchange (the reducer's `exchange` hook: call() runs it,
    start() starts it), at most once."""

    def __init__(self, reducer):
        self.reducer, self.done, self.since = reducer, False, time.monotonic()

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            guarded(self.reducer, self.reducer.exchange.call)

    def if_long(self) -> None:
        """Run it if the wait has lasted AGREE_AFTER_SECONDS."""
        if not self.done and time.monotonic() - self.since > AGREE_AFTER_SECONDS:
            self()

    def later(self) -> None:
        """The buckets are done: start it; the engine reads its outcome later."""
        if not self.done:
            self.done = True
            guarded(self.reducer, self.reducer.exchange.start)


def agreement(reducer) -> Once | None:
    """This step's agreement on its exchange; run at once where urgent (ranks joined)."""
    if reducer.exchange is None:
        return None
    agree = Once(reducer)
    if reducer.exchange.urgent:
        agree()
    return agree


def guarded(reducer, wait, *args) -> None:
    """A wait that may fail (a peer left or is elsewhere): then buckets already started may
    never complete, and the reducer is broken."""
    try:
        wait(*args)
    except BaseException:
        reducer._broken = True
        raise


def wait_bucket(b, agree: Once | None = None) -> None:
    """Training thread: wait until bucket b's reduction is done (overlap thread)."""
    while not b.done.wait(POLL_SECONDS):
        if agree is not None:
            agree.if_long()
        _check(b)


def wait_requests(buckets, agree: Once | None = None) -> None:
    """Training thread: wait for the buckets' nonblocking requests (overlap nonblocking)."""
    from mpi4py import MPI

    requests = [b.request for b in buckets]
    pause = 1e-4
    while not MPI.Request.Testall(requests):
        if agree is not None:
            agree.if_long()
        _check(buckets[-1])  # the last one: a peer that left before it never comes
        time.sleep(pause)
        pause = min(pause * 2, POLL_SECONDS)


def _check(b) -> None:
    check("gradients", getattr(b, "seq", 0), f"bucket allreduce {b.index}")
