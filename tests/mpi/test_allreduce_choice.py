"""The allreduce algorithm choice (hpcaccel/comm/allreduce_choice.py, --allreduce): auto keeps the
library's shared-memory allreduce on one host and picks ring or hierarchical across hosts;
every choice sums like MPI_Allreduce."""
import numpy as np
import pytest

pytestmark = pytest.mark.mpi(min_size=2)


def values(n, rank, dtype=np.float32):
    return ((np.arange(n) * 5 + rank * 11) % 97 - 48).astype(dtype)


@pytest.mark.parametrize("hosts, per_host, want", [
    (1, 4, "sliced"), (1, 1, "sliced"), (2, 1, "ring"), (4, 1, "ring"), (2, 2, "hierarchical"),
    (3, None, "ring"),
])
def test_auto_choice(hosts, per_host, want):
    from hpcaccel.comm.allreduce_choice import resolve

    assert resolve("auto", hosts, per_host) == want
    assert resolve("ring", hosts, per_host) == "ring"


@pytest.mark.parametrize("name, want", [("auto", "sliced"), ("sliced", "sliced"), ("ring", "ring"),
                                        ("hierarchical", "hierarchical")])
def test_make_algorithm_on_one_host(name, want):
    """auto keeps the library's shared-memory allreduce on one host; every choice sums."""
    from mpi4py import MPI

    from hpcaccel.comm.allreduce_choice import describe, make_algorithm

    world = MPI.COMM_WORLD
    algo = make_algorithm(world, name)
    try:
        assert algo.name == want
        assert describe(algo)
        got = values(9_999, world.rank)
        want_sum = got.copy()
        world.Allreduce(MPI.IN_PLACE, want_sum)
        algo.allreduce_(got, MPI.SUM)
        np.testing.assert_array_equal(got, want_sum)
    finally:
        getattr(algo, "close", lambda: None)()


def test_unknown_name_is_a_usage_error():
    from mpi4py import MPI

    from hpcaccel.comm.allreduce_choice import make_algorithm
    from hpcaccel.errors import UsageError

    with pytest.raises(UsageError, match="--allreduce"):
        make_algorithm(MPI.COMM_WORLD, "tree")
