"""Each step's gradient exchange of a DistributedOptimizer, agreed on hvd's engine.

The reducer (hpcaccel/comm/mpi.py) moves a step's buckets on its own communicator and
thread, started during backward. Each synchronize() also agrees on one `ExchangeOp` on
the engine (its round started once the buckets are done and read by the engine's next
operation or the next step's round, or run while waiting for the buckets where that lasts
0.25 s: comm/waits.py), in program order with the script's other operations: the engine's round (agreement.py) checks
that every rank is in the same DistributedOptimizer's exchange. A
rank in hvd.allreduce('train_loss') while another is in optimizer.step() (uneven data
without join) is then an error on both, naming what each was in, instead of two ranks
waiting forever on two communicators; a rank that joined (hvd.join()) takes part in the
buckets with zeros; one that left fails the exchange, naming it.

Cost per step: one round (a 56-byte nonblocking allreduce at up to 64 ranks, started and
later read in the training thread); measured in docs/reliability.md.
"""
from __future__ import annotations

from .engine import Operation


class ExchangeOp(Operation):
    kind = "gradient exchange"
    channel = None  # its buckets count on the gradients channel (the reducer enters them)

    def __init__(self, index: int, reducer):
        super().__init__(f"DistributedOptimizer #{index}")
        self.index, self.reducer = index, reducer
        self._layout = self._descriptor = None

    def fields(self):
        r = self.reducer
        return [f"{len(r.buckets)} buckets", f"{sum(b.numel for b in r.buckets)} values"]

    def descriptor(self):
        """The same every step, while the buckets are (made once per layout)."""
        layout = id(self.reducer.buckets)
        if layout != self._layout:
            self._layout, self._descriptor = layout, super().descriptor()
        return self._descriptor

    def join_spec(self):
        from ..comm.joined import joinable
        return self.joins_as("exchange", self.index) if joinable(self.reducer) else None

    def run(self, comm):
        return None  # the buckets move on the reducer's thread


class Agreement:
    """The reducer's `exchange` hook (comm/waits.py): one step's exchange agreed."""

    def __init__(self, engine, index: int, reducer):
        self.engine, self.index, self.reducer = engine, index, reducer
        self.op = ExchangeOp(index, reducer)  # stateless: one for every step

    @property
    def urgent(self) -> bool:
        """Ranks have joined: they take part in the buckets only after the round."""
        return self.engine.rounds.joined != 0

    def call(self) -> None:
        """Agree now (HorovodInternalError where ranks are elsewhere or one left)."""
        self.engine.call(self.op)

    def start(self) -> None:
        """Start agreeing, leaving the round pending (engine.post): every rank took part in
        the buckets, so only a mismatch elsewhere can fail it; raises a previous one's."""
        self.engine.post(self.op)


def agree_each_exchange(reducer, runtime) -> None:
    """From now on every synchronize() of `reducer` is agreed on runtime's engine; it is
    runtime's DistributedOptimizer number `index` (creation order, the same on every rank),
    by which a joined rank finds it."""
    reducer.exchange = Agreement(runtime.engine, runtime.add_reducer(reducer), reducer)
