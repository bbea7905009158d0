"""--timeline: one process row per rank, spans in microseconds from the start barrier, a
JSON array Perfetto reads after every flush. One rank (COMM_SELF): the format; the
cross-rank gather is exercised end to end in tests/integration.

Here, not in tests/unit: it initialises MPI, and a process with MPI initialised (a
singleton) passes its PMIx variables to every child at the C level, so an `mpirun` that a
later single-process test starts would fail silently (exit 1, no output)."""
import json
import threading
import time

import pytest

from hpcaccel.control import ControlPlane
from hpcaccel.errors import UsageError
from hpcaccel.timeline import NullTimeline, Timeline


def self_control():
    from mpi4py import MPI
    return ControlPlane(MPI.COMM_SELF)


def test_nothing_is_written_before_start_and_spans_land_after_each_flush(tmp_path):
    path = tmp_path / "trace.json"
    tl = Timeline(str(path), self_control())
    assert not path.exists()  # constructed during set-up: bad input must not touch files
    tl.start()
    t0 = time.perf_counter()
    tl.add("forward_backward", t0, t0 + 0.002, step=1)
    with tl.span("checkpoint"):
        pass
    tl.flush()
    # a run killed now still leaves a readable trace (the array may lack its `]`)
    events = json.loads(path.read_text() + "]")
    spans = [e for e in events if e["ph"] == "X"]
    assert [s["name"] for s in spans] == ["forward_backward", "checkpoint"]
    assert spans[0]["args"] == {"step": 1} and spans[0]["dur"] == pytest.approx(2000, abs=1)
    assert all(s["pid"] == 0 and s["ts"] >= 0 for s in spans)
    tl.close()
    events = json.loads(path.read_text())
    assert {e["args"]["name"] for e in events if e["ph"] == "M"} >= {"rank 0", "training loop",
                                                                     "communication thread"}


def test_bucket_allreduces_get_the_communication_row_and_threads_may_record(tmp_path):
    path = tmp_path / "trace.json"
    tl = Timeline(str(path), self_control()).start()
    t = time.perf_counter()
    workers = [threading.Thread(target=tl.add, args=("bucket_allreduce", t, t + 1e-3),
                                kwargs={"bucket": i}) for i in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    tl.close()
    spans = [e for e in json.loads(path.read_text()) if e["ph"] == "X"]
    assert sorted(s["args"]["bucket"] for s in spans) == list(range(8))
    assert {s["tid"] for s in spans} == {1}


def test_unwritable_file_is_a_usage_error_naming_the_flag(tmp_path):
    tl = Timeline(str(tmp_path / "no" / "such" / "dir" / "t.json"), self_control())
    with pytest.raises(UsageError, match=r"^--timeline .*t\.json: cannot write"):
        tl.start()


def test_null_timeline_takes_the_same_calls():
    tl = NullTimeline().start()
    tl.add("x", 0.0, 1.0, step=1)
    with tl.span("y", epoch=1):
        pass
    tl.flush()
    tl.close()
