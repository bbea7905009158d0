"""The stall watchdog: beats keep it quiet; silence longer than the timeout reports the last
step and aborts. The abort is a recording function here (the real one is MPI_Abort), and the
os._exit back-up is replaced so the test process survives."""
import threading
import time

from hpcaccel import watchdog as wd
from hpcaccel.watchdog import Watchdog


def test_regular_beats_never_abort():
    aborted = threading.Event()
    dog = Watchdog(0.5, rank=0, abort=aborted.set, poll=0.05).start()
    try:
        for step in range(15):
            dog.beat(step)
            time.sleep(0.05)
    finally:
        dog.stop()
    assert not aborted.is_set()


def test_silence_aborts_and_names_rank_phase_and_step(monkeypatch, capsys):
    aborted = threading.Event()
    exits = []
    monkeypatch.setattr(wd.os, "_exit", exits.append)
    monkeypatch.setattr(wd.threading, "Timer", lambda *a, **k: type("T", (), {"start": lambda s: None})())
    dog = Watchdog(0.2, rank=3, abort=aborted.set, poll=0.02).start()
    dog.beat(7, "evaluation")
    assert aborted.wait(5), "the watchdog did not abort within 5 s of a 0.2 s timeout"
    dog.stop()
    dog._thread.join(5)  # before the patches are undone: the real os._exit would end pytest
    assert exits and set(exits) == {1}
    err = capsys.readouterr().err
    assert "rank 3: no progress for" in err and "in evaluation after step 7" in err
    assert "--stall-timeout 0.2" in err


def test_timeout_zero_watches_nothing():
    dog = Watchdog(0, rank=0, abort=None).start()
    assert dog._thread is None
    dog.beat(1)
    dog.stop()
