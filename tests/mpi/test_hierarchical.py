"""The node-aware allreduce (hpcaccel/comm/hierarchical.py) on one machine. Hosts are emulated by splitting the world into groups of
consecutive ranks (the `layout` a real job gets from COMM_TYPE_SHARED); tests/hosts/
checks it across real emulated hosts."""
import numpy as np
import pytest

pytestmark = pytest.mark.mpi(min_size=2)


def fake_layout(world, per_host):
    """(local communicator, hosts, ranks per host) as if every `per_host` consecutive ranks
    shared a host."""
    local = world.Split(world.rank // per_host, world.rank)
    return local, world.size // per_host, per_host


def layouts(size):
    """Ranks per host that divide the world: 1 (one rank per host) up to all on one host."""
    return [k for k in range(1, size + 1) if size % k == 0]


def values(n, rank, dtype=np.float32):
    return ((np.arange(n) * 5 + rank * 11) % 97 - 48).astype(dtype)


LAYOUTS = {"pieces40B-parts40B": (40, 40), "pieces40B-parts4K": (40, 4000),
           "pieces1M": (1 << 20, 1 << 20)}


# 40-byte pieces and parts on 100,001 elements are 10,000 ring steps per layout, 90 s at 4
# ranks on 2 cores: there 10,007 (uneven, a thousand steps) shows the same; 100,001 stays
# with larger parts.
@pytest.mark.parametrize("name,n", [(name, n) for name in LAYOUTS for n in
                                    (0, 1, 5, 1000, 10_007 if name == "pieces40B-parts40B" else 100_001)])
def test_sum_equals_mpi_allreduce_for_every_layout(name, n):
    chunk_bytes, part_bytes = LAYOUTS[name]
    from mpi4py import MPI

    from hpcaccel.comm.hierarchical import HierarchicalAllreduce

    world = MPI.COMM_WORLD
    for per_host in layouts(world.size):
        algo = HierarchicalAllreduce(world, chunk_bytes=chunk_bytes, segment_bytes=256,
                                     layout=fake_layout(world, per_host), part_bytes=part_bytes)
        algo.ring.small_bytes = 0  # the ring itself, also for the small parts
        try:
            for dtype in (np.float32, np.int64):
                got = values(n, world.rank, dtype)
                want = got.copy()
                world.Allreduce(MPI.IN_PLACE, want)
                algo.allreduce_(got, MPI.SUM)
                np.testing.assert_array_equal(got, want, err_msg=f"{per_host} ranks per host")
                gathered = world.allgather(got.tobytes())
                assert all(g == gathered[0] for g in gathered)
        finally:
            algo.close()


def test_real_layout_is_one_host_here():
    """On one machine every rank shares memory: one host of world-size ranks."""
    from mpi4py import MPI

    from hpcaccel.comm.hierarchical import node_layout

    local, hosts, per_host = node_layout(MPI.COMM_WORLD)
    try:
        assert (hosts, per_host, local.size) == (1, MPI.COMM_WORLD.size, MPI.COMM_WORLD.size)
    finally:
        local.Free()


def test_uneven_hosts_are_refused():
    from hpcaccel.comm.hierarchical import HierarchicalAllreduce
    from mpi4py import MPI

    with pytest.raises(ValueError, match="same number of ranks"):
        HierarchicalAllreduce(MPI.COMM_WORLD, layout=(MPI.COMM_SELF, 2, None))
