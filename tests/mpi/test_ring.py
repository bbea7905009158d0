"""The pipelined ring allreduce (hpcaccel/comm/ring.py): the same sum as MPI_Allreduce on
every rank, bit for bit identical across ranks, for any length (empty, shorter than the
world, not a multiple of it, many segments), dtype and op the mpi reducer hands it, on the
world, a duplicate, and the odd and even halves of the world."""
import numpy as np
import pytest

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(params=["world", "dup", "halves"])
def ring_comm(request):
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if request.param == "world":
        yield world
        return
    comm = world.Dup() if request.param == "dup" else world.Split(world.rank % 2, world.rank)
    yield comm
    comm.Free()


def make_ring(comm, segment_bytes):
    from hpcaccel.comm.ring import RingAllreduce
    return RingAllreduce(comm, segment_bytes=segment_bytes, small_bytes=0)  # always the ring


def values(n, rank, dtype):
    """Per-rank data whose float sum is exact (small integers), so MPI's and the ring's
    different summation orders must agree exactly."""
    return ((np.arange(n) * 7 + rank * 13) % 101 - 50).astype(dtype)


def assert_same_on_every_rank(comm, array):
    gathered = comm.allgather(array.tobytes())
    assert all(g == gathered[0] for g in gathered), "ranks disagree"


@pytest.mark.parametrize("n", [0, 1, 3, 7, 64, 1000, 100_003])
@pytest.mark.parametrize("segment_bytes", [8, 4096, 48 << 10], ids=["seg8B", "seg4K", "seg48K"])
def test_sum_equals_mpi_allreduce(ring_comm, n, segment_bytes):
    from mpi4py import MPI

    if segment_bytes == 8 and n > 1000:
        pytest.skip("one message per element: covered by the smaller lengths")
    ring = make_ring(ring_comm, segment_bytes)
    try:
        for dtype in (np.float32, np.float64, np.int64):
            got = values(n, ring_comm.rank, dtype)
            want = got.copy()
            ring_comm.Allreduce(MPI.IN_PLACE, want, op=MPI.SUM)
            ring.allreduce_(got, MPI.SUM)
            np.testing.assert_array_equal(got, want)
            assert_same_on_every_rank(ring_comm, got)
    finally:
        ring.close()


@pytest.mark.parametrize("op", ["MAX", "MIN"])
def test_other_ops(ring_comm, op):
    from mpi4py import MPI

    ring = make_ring(ring_comm, 256)
    try:
        got = values(5_000, ring_comm.rank, np.float32) * (ring_comm.rank + 1)
        want = got.copy()
        ring_comm.Allreduce(MPI.IN_PLACE, want, op=getattr(MPI, op))
        ring.allreduce_(got, getattr(MPI, op))
        np.testing.assert_array_equal(got, want)
    finally:
        ring.close()


def test_16bit_wire_with_user_op_is_identical_on_every_rank(ring_comm):
    """bf16 travels as [int16 array, MPI INT16_T] with the reducer's user-defined sum: the
    ring reduces with that op and every rank ends with the same bits."""
    import torch
    from mpi4py import MPI

    from hpcaccel.comm.wire import wire_sum_op

    ring = make_ring(ring_comm, 1000)
    try:
        n = 30_001
        mine = torch.linspace(-1, 1, n, dtype=torch.float32) * (ring_comm.rank + 1) / 3
        wire = mine.to(torch.bfloat16)
        ring.allreduce_([wire.view(torch.int16).numpy(), MPI.INT16_T], wire_sum_op(torch.bfloat16))
        exact = sum(torch.linspace(-1, 1, n) * (r + 1) / 3 for r in range(ring_comm.size))
        # one bf16 rounding per addition: within a few bf16 ulps of the exact sum
        assert torch.allclose(wire.float(), exact, rtol=2 ** -6 * ring_comm.size, atol=1e-2)
        assert_same_on_every_rank(ring_comm, wire.view(torch.int16).numpy())
    finally:
        ring.close()


def test_small_buffers_take_the_library_allreduce(ring_comm):
    from hpcaccel.comm.ring import RingAllreduce

    ring = RingAllreduce(ring_comm, segment_bytes=64, small_bytes=4000)
    sums_like_the_library(ring, ring_comm, (999, 1000, 1001))  # float32: below, at, above 4000 B


def test_repeated_calls_reuse_the_ring(ring_comm):
    """Back-to-back allreduces of different lengths (a reducer's buckets) stay matched."""
    sums_like_the_library(make_ring(ring_comm, 512), ring_comm, (10, 5_000, 3, 77_777, 0, 12))


def sums_like_the_library(ring, comm, lengths):
    """Back-to-back float32 sums of these lengths equal the library's MPI_Allreduce; closes
    the ring."""
    from mpi4py import MPI

    try:
        for n in lengths:
            got = values(n, comm.rank, np.float32)
            want = got.copy()
            comm.Allreduce(MPI.IN_PLACE, want)
            ring.allreduce_(got, MPI.SUM)
            np.testing.assert_array_equal(got, want)
    finally:
        ring.close()
