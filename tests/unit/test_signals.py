"""Stop requests: ranks act on the agreed decision, never on their own late signal."""
import signal

from hpcaccel.signals import StopRequest


def test_a_signal_after_the_steps_vote_waits_for_the_next_vote():
    stop = StopRequest(signals=())
    assert not stop.agreed(0.0)              # this step's vote: no rank had a signal
    stop._handle(signal.SIGUSR1, None)       # lands between the vote and the loop's check
    assert stop.stopping is None             # so this rank does not stop alone
    assert stop.local_flag() == signal.SIGUSR1
    assert stop.agreed(stop.local_flag())    # it is carried by the next step's vote
    assert stop.stopping == signal.SIGUSR1 and stop.name == "SIGUSR1"


def test_a_signal_on_another_rank_stops_this_one_too():
    stop = StopRequest(signals=())
    assert stop.received is None and stop.agreed(float(signal.SIGTERM))
    assert stop.name == "SIGTERM"
