"""What the hang report (hpcaccel/hang_report.py) sees of hpcaccel.torch's collectives on
real MPI: the collective a rank waits in, with the bytes it moves."""
import time

import pytest
import torch

import hpcaccel.torch as hvd
from hpcaccel.hang_report import describe, rank_state


@pytest.fixture(autouse=True, scope="module")
def initialized():
    hvd.init()
    yield
    hvd.shutdown()


@pytest.mark.parametrize("make", [lambda: hvd.allreduce_async(torch.tensor(1.0), name="small"),
                                  lambda: hvd.broadcast_async(torch.ones(3), 0, name="b")],
                         ids=["allreduce", "broadcast"])
def test_a_waiting_collective_shows_the_bytes_it_moves(make):
    from mpi4py import MPI

    world, r, n = MPI.COMM_WORLD, hvd.rank(), hvd.size()
    if n == 1:
        pytest.skip("nothing to wait for at one rank")
    if r == 0:  # submits alone; the others submit once it has looked at its state
        handle = make()
        deadline = time.monotonic() + 10
        while (opened := rank_state(0, "training", 0)["open"]["collectives"]) is None:
            assert time.monotonic() < deadline, "the collective never showed as open"
            time.sleep(0.001)
        for peer in range(1, n):
            world.send(None, dest=peer, tag=7)
    else:
        world.recv(source=0, tag=7)
        handle = make()
    hvd.synchronize(handle)
    if r == 0:
        size = 4 if opened["kind"] == "allreduce" else 12  # one float32; three
        assert opened["bytes"] == size and f", {size} bytes, " in describe(opened), opened
