"""The control plane: values, votes, gathers and failing together, on the world, a
duplicate of it and a one-rank communicator. Assertions in terms of the communicator size."""
import numpy as np
import pytest

from hpcaccel.control import ControlPlane
from hpcaccel.errors import SetupFailed, UsageError


@pytest.fixture(params=["world", "world-dup", "self"], ids=["comm-world", "comm-dup", "comm-self"])
def control(request):
    from mpi4py import MPI

    if request.param == "world-dup":
        dup = MPI.COMM_WORLD.Dup()
        yield ControlPlane(dup)
        dup.Free()
    else:
        yield ControlPlane(MPI.COMM_SELF if request.param == "self" else MPI.COMM_WORLD)


def test_allreduce_mean_and_votes(control):
    rank, size = control.rank, control.size
    out = control.allreduce(np.array([rank, 1.0]))
    np.testing.assert_allclose(out, [size * (size - 1) / 2, size])
    assert control.allreduce([rank], "max")[0] == size - 1
    assert control.allreduce([rank], "min")[0] == 0
    assert control.mean(float(rank), 2.0) == pytest.approx([(size - 1) / 2, 2.0])
    assert control.any(rank == size - 1) is True      # one rank's vote carries
    assert control.any(False) is False


def test_objects_and_barrier(control):
    rank, size = control.rank, control.size
    assert control.broadcast({"a": rank}) == {"a": 0}
    gathered = control.gather(rank * 10)
    assert gathered == ([r * 10 for r in range(size)] if rank == 0 else None)
    assert control.allgather(rank) == list(range(size))
    control.barrier()
    assert control.is_main == (rank == 0)


def test_failure_on_one_rank_fails_every_rank_with_the_lowest_ranks_error(control):
    rank, size = control.rank, control.size
    assert control.collectively(lambda: rank + 1) == rank + 1

    def fails_on_last():
        if rank == size - 1:
            raise OSError("disk gone")
        return "fine"
    with pytest.raises(SetupFailed, match=rf"^rank {size - 1}: OSError: disk gone$"):
        control.collectively(fails_on_last)

    def bad_input_everywhere():
        raise UsageError(f"--data x{rank}: no such file")
    with pytest.raises(UsageError, match=r"^--data x0: no such file$"):  # rank 0's line
        control.collectively(bad_input_everywhere)


@pytest.mark.parametrize("wait", ["agree", "barrier"])
def test_ranks_waiting_for_a_busy_peer_leave_it_the_cpu(control, wait):
    """Rank 0 works alone for a while (a checkpoint, staging); the others wait in agree() or
    barrier() without polling at full speed: they use a small fraction of the wall time in
    CPU (a blocking MPI collective spins at about 100%)."""
    import time
    control.barrier()
    # this thread's CPU time only: Horovod's background thread, started by earlier tests in
    # this process, polls on its own
    wall, cpu = time.perf_counter(), time.thread_time()
    if control.rank == 0:
        time.sleep(1.5)
    control.agree(None) if wait == "agree" else control.barrier()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    if control.rank != 0:
        assert wall >= 1.4 and cpu < 0.25 * wall, (wall, cpu)
