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
It also keeps how many collectives each channel issued since the step began and in the
whole previous step (a step begins where the loop tells the watchdog so): a training loop
issues the same ones every step, so a rank above its own rhythm issued an extra one.

Local only: the counters never communicate; updates are a few attribute writes (no lock:
each channel is written by one thread, and a torn read only blurs one report line).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

CHANNELS = ("control", "gradients", "collectives")


class Tracker:
    def __init__(self):
        self._step = 0
        self.seq = {c: 0 for c in CHANNELS}
        self.open = {c: None for c in CHANNELS}  # channel -> (seq, kind, step, nbytes, since)
        self._began = dict(self.seq)  # counts when this step began
        self._last = None             # counts of the whole previous step (None: not yet one)
        self._steps_begun = 0

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, step: int) -> None:
        """Local. `step` steps are complete (the watchdog's beat): a new step begins."""
        if step != self._step:
            self._steps_begun += 1
            if self._steps_begun > 1:  # the first "step" held the set-up's collectives too
                self._last = {c: self.seq[c] - self._began[c] for c in CHANNELS}
            self._began = dict(self.seq)
        self._step = step

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
                "this_step": {c: self.seq[c] - self._began[c] for c in CHANNELS},
                "last_step": None if self._last is None else dict(self._last),
                "open": {c: None if o is None else {"seq": o[0], "kind": o[1], "step": o[2],
                                                    "bytes": o[3], "waiting_s": round(now - o[4], 1)}
                         for c, o in self.open.items()}}


TRACKER = Tracker()
