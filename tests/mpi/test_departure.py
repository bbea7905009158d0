"""Leaving is an event (hpcaccel/departure.py), on real MPI: a rank's notice fails exactly
the collectives it never entered, never the last one it took part in, and the control
plane's waits see it. Assertions in terms of the world size, at any rank count."""
import time

import pytest
from mpi4py import MPI

from hpcaccel import departure
from hpcaccel.control import ControlPlane
from hpcaccel.departure import Departures, PeerLeft


def wait_for_notice(d, rank):
    deadline = time.monotonic() + 10
    while rank not in d.left:
        assert time.monotonic() < deadline, "the notice never arrived"
        d.poll()
        time.sleep(0.001)


def test_a_notice_fails_only_the_collectives_the_leaver_never_entered():
    comm = MPI.COMM_WORLD
    r, n = comm.Get_rank(), comm.Get_size()
    if n == 1:
        pytest.skip("no one to leave")
    counts = {"control": 7}  # counts are taken from here on: 7 is the base
    d = Departures(comm, counts=lambda: dict(counts))
    leaver = n - 1
    counts["control"] = 10  # every rank entered 3 collectives since
    if r == leaver:
        d.announce(1)
    else:
        wait_for_notice(d, leaver)
        d.check("control", 10)  # its last collective: it took part, so no error
        d.check("gradients", 0)
        with pytest.raises(PeerLeft, match=rf"rank {leaver} left the job: it called "
                                           rf"hvd.shutdown\(\), after 3 control"):
            d.check("control", 11)
    comm.Barrier()


def test_the_control_planes_wait_fails_naming_the_rank_that_left():
    comm = MPI.COMM_WORLD
    r, n = comm.Get_rank(), comm.Get_size()
    if n == 1:
        pytest.skip("no one to leave")
    plane = ControlPlane(comm.Dup())
    d = Departures(comm)
    leaver = n - 1
    departure.install(d)
    try:
        assert plane.allreduce([1.0])[0] == n  # every rank there
        if r == leaver:
            d.announce(0)
        else:
            with pytest.raises(PeerLeft, match=rf"rank {leaver} left the job"):
                plane.allreduce([1.0])
            with pytest.raises(PeerLeft, match=rf"rank {leaver} left the job"):
                plane.barrier()  # and the next one
    finally:
        departure.install(None)
    comm.Barrier()
    if r == leaver:  # the others' abandoned collectives: complete them, so MPI can finalize
        plane.allreduce([1.0])  # (and every rank counts the same collectives again)
        plane.barrier()


def test_ranks_waiting_in_different_collectives_all_fail_naming_them():
    # the last rank goes into a gradients collective while the others wait in a control
    # allreduce it never issues: every rank fails within seconds (no timeout: the waits tell)
    from hpcaccel.collectives import TRACKER
    from hpcaccel.departure import PeersDisagree

    comm = MPI.COMM_WORLD
    r, n = comm.Get_rank(), comm.Get_size()
    if n == 1:
        pytest.skip("one rank cannot disagree")
    plane, grads = ControlPlane(comm.Dup()), comm.Dup()
    departure.install(Departures(comm))
    last = n - 1
    t0 = time.monotonic()
    try:
        with pytest.raises(PeersDisagree) as e:
            if r == last:
                TRACKER.enter("bucket allreduce", 0, "gradients")
                departure.wait_request(grads.Ibarrier(), "gradients", TRACKER.seq["gradients"],
                                       "bucket allreduce 0")
            else:
                plane.allreduce([1.0], "max")
        took = time.monotonic() - t0
    finally:
        departure.install(None)
    said = str(e.value)
    assert "the ranks run different collectives" in said, said
    assert f"rank {last} waits in gradients collective #1 (bucket allreduce 0)" in said, said
    assert "waits in control collective #1 (allreduce-max)" in said, said
    assert took < 30, took  # about 1.5 s from the waits' start; generous for loaded machines
    comm.Barrier()  # every rank failed (completing a collective first would let a peer's wait end)
    # complete the abandoned collectives, so every rank counts the same again
    if r == last:
        plane.allreduce([1.0], "max")
    else:
        TRACKER.enter("bucket allreduce", 0, "gradients")
        grads.Ibarrier().Wait()  # nonblocking, as the one it completes (blocking ones never match it)
    TRACKER.leave("gradients")
    comm.Barrier()


def test_a_slow_rank_is_waited_for_however_long_it_computes():
    comm = MPI.COMM_WORLD
    r, n = comm.Get_rank(), comm.Get_size()
    plane = ControlPlane(comm.Dup())
    departure.install(Departures(comm))
    try:
        if r == n - 1:
            time.sleep(3.0)  # computing: it tells no wait, so nobody is stuck for it
        assert plane.allreduce([1.0])[0] == n
    finally:
        departure.install(None)
    comm.Barrier()
