"""Stop requests: SIGUSR1 (Slurm's warning before the time limit) and SIGTERM (preemption,
scancel) set a flag; the loop asks all ranks at each step boundary whether any rank got one.

Cross-rank invariant: the decision to stop is a collective max over ranks, so either every
rank stops after the same step or none does, even if the signal reached only some ranks.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """`received`: this rank's own signal, set asynchronously by the handler at any moment.
    `stopping`: the decision all ranks share, set only by agreed(). The loop must act on
    `stopping` alone: a signal landing between a step's vote and the loop's check would
    otherwise make this rank stop while its peers, who voted without it, go on (and wait
    for it in their next collective forever)."""

    def __init__(self, signals=STOP_SIGNALS):
        self.received: int | None = None
        self.stopping: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def local_flag(self) -> float:
        """This rank's vote for the per-step max-reduction (0: no signal)."""
        return 0.0 if self.received is None else float(self.received)

    def agreed(self, reduced_flag: float) -> bool:
        """Given the max of all ranks' flags: stop? The same answer on every rank."""
        if reduced_flag:
            self.stopping = int(reduced_flag)  # possibly a signal that reached another rank
        return bool(reduced_flag)

    @property
    def name(self) -> str:
        return signal.Signals(self.stopping).name if self.stopping else "none"

    def ignore_further(self) -> None:
        """The run is ending (checkpointed, or finished): a stop signal has nothing left to
        stop. Ignore further ones, because Python puts back the default handlers while the
        process exits, and a signal then (Slurm's and the batch script's both reach the
        ranks) would turn exit code 3 or 0 into death by signal."""
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)
