"""Step timeline: per-rank spans written as a Chrome trace (open in Perfetto or
chrome://tracing), like Horovod's timeline.

Each rank records spans (data wait, forward/backward, exposed allreduce wait, optimizer
step, and each gradient bucket's allreduce on the communication thread) against its own
clock, zeroed right after a barrier so ranks line up to within the barrier's skew. At
every flush (end of epoch, end of run) the spans are gathered to rank 0, which appends
them to FILE: one process row per rank, one thread row per activity. The file is a JSON
array; it is closed at the end, and a run killed before that still leaves a trace
Perfetto reads (the array format allows a missing `]`).

One Timeline object is handed at construction to everything that records spans (the
reader, the reducer, the trainer); without --timeline they get a NullTimeline.

Cross-rank invariant: start(), flush() and close() are collective; every rank calls them at
the same points. add() and span() are local and thread-safe.
"""
from __future__ import annotations

import json
import threading
import time

# thread rows in the trace, per rank
ROWS = {"data_wait": 0, "forward_backward": 0, "allreduce_wait": 0, "optimizer_step": 0,
        "evaluate": 0, "checkpoint": 0, "bucket_allreduce": 1}
ROW_NAMES = {0: "training loop", 1: "communication thread"}


class Timeline:
    def __init__(self, path: str, control):
        """path: the trace file (written by rank 0 from start() on); control: the job's
        ControlPlane. Local: nothing is written until start()."""
        self.path, self.control = path, control
        self.rank = control.rank
        self._spans: list[tuple] = []
        self._lock = threading.Lock()  # the communication thread records too
        self._t0 = time.perf_counter()

    def start(self) -> "Timeline":
        """Collective: zero every rank's clock right after a barrier; rank 0 creates the file
        (UsageError if it cannot: agree on it with ControlPlane.collectively)."""
        self.control.barrier()
        self._t0 = time.perf_counter()
        if self.rank == 0:
            try:
                fh = open(self.path, "w")
            except OSError as e:
                from .errors import UsageError
                raise UsageError(f"--timeline {self.path}: cannot write ({e.strerror})") from None
            with fh:
                fh.write("[\n")
                meta = [{"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"rank {r}"}}
                        for r in range(self.control.size)]
                meta += [{"name": "thread_name", "ph": "M", "pid": r, "tid": t, "args": {"name": n}}
                         for r in range(self.control.size) for t, n in ROW_NAMES.items()]
                fh.write(",\n".join(json.dumps(m) for m in meta))
        return self

    def add(self, name: str, start: float, end: float, **args) -> None:
        """A span between two time.perf_counter() readings of this process."""
        with self._lock:
            self._spans.append((name, start, end, args))

    def count(self, name: str, **values) -> None:
        """A counter sample now (a Chrome trace "C" event: one graph per name and rank)."""
        with self._lock:
            self._spans.append((name, time.perf_counter(), None, values))

    def span(self, name: str, **args):
        return _Span(self, name, args)

    def flush(self) -> None:
        """Collective: rank 0 appends every rank's spans recorded since the last flush."""
        with self._lock:
            mine, self._spans = self._spans, []
        events = [{"name": n, "cat": n, "ph": "X", "pid": self.rank, "tid": ROWS.get(n, 0),
                   "ts": round((s - self._t0) * 1e6, 1), "dur": round((e - s) * 1e6, 1),
                   **({"args": a} if a else {})} if e is not None else
                  {"name": n, "ph": "C", "pid": self.rank, "ts": round((s - self._t0) * 1e6, 1),
                   "args": a} for n, s, e, a in mine]
        gathered = self.control.gather(events, root=0)
        if self.rank == 0:
            lines = [json.dumps(ev) for per_rank in gathered for ev in per_rank]
            if lines:
                with open(self.path, "a") as fh:
                    fh.write(",\n" + ",\n".join(lines))

    def close(self) -> None:
        """Collective: flush and terminate the JSON array."""
        self.flush()
        if self.rank == 0:
            with open(self.path, "a") as fh:
                fh.write("\n]\n")


class _Span:
    def __init__(self, timeline, name, args):
        self.timeline, self.name, self.args = timeline, name, args

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timeline.add(self.name, self.start, time.perf_counter(), **self.args)
        return False


class NullTimeline:
    """Records nothing: the loop calls the same methods with or without --timeline."""

    def start(self):
        return self

    def add(self, *a, **k):
        pass

    def count(self, *a, **k):
        pass

    def span(self, *a, **k):
        return _NULL_SPAN

    def flush(self):
        pass

    def close(self):
        pass


class _NullSpan:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL_SPAN = _NullSpan()
