"""Which collective each rank is in: a per-rank sequence number for the hang report.

Every collective the training loop issues advances a counter on its channel, with its kind,
the step and its size:
  control    ControlPlane (per-step vote, metric means, gathers, barriers, evaluation sums)
  gradients  the reducer's bucket allreduces (entered per bucket as it is launched, left
             when synchronize() has every bucket)
  collectives  hpcaccel.torch's tensor collectives (allreduce, allgather, broadcast from a
             script), in its engine thread
Ranks issue the same collectives in the same order, so after a hang equal counters mean
"waiting in the same collective"; a rank with no collective open holds the others up, and
one whose collective differs skipped or added one. `hang_report.py` reads `snapshot()`.

Local only: the counters never communicate; updates are a few attribute writes (no lock:
each channel is written by one thread, and a torn read only blurs one report line).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

CHANNELS = ("control", "gradients", "collectives")


class Tracker:
    def __init__(self):
        self.step = 0
        self.seq = {c: 0 for c in CHANNELS}
        self.open = {c: None for c in CHANNELS}  # channel -> (seq, kind, step, nbytes, since)

    def enter(self, kind: str, nbytes: int = 0, channel: str = "control") -> None:
        """Local. A collective of `kind` moving `nbytes` starts on `channel`."""
        self.seq[channel] += 1
        self.open[channel] = (self.seq[channel], kind, self.step, int(nbytes), time.monotonic())

    def leave(self, channel: str = "control") -> None:
        """Local. The open collective of `channel` completed."""
        self.open[channel] = None

    @contextmanager
    def track(self, kind: str, nbytes: int = 0, channel: str = "control"):
        self.enter(kind, nbytes, channel)
        try:
            yield
        finally:
            self.leave(channel)

    def snapshot(self) -> dict:
        """Local. The counters and the open collective of each channel (None: none open)."""
        now = time.monotonic()
        return {"step": self.step, "seq": dict(self.seq),
                "open": {c: None if o is None else {"seq": o[0], "kind": o[1], "step": o[2],
                                                    "bytes": o[3], "waiting_s": round(now - o[4], 1)}
                         for c, o in self.open.items()}}


TRACKER = Tracker()
