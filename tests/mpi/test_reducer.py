"""The reducer averages gradients exactly, for awkward shapes and bucket layouts, on every
communicator of the contract (world, a duplicate, a one-rank COMM_SELF; see conftest)."""
import numpy as np
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.mpi(min_size=2)


class Many(nn.Module):
    """Odd sizes, many small tensors, one tensor larger than a bucket, one unused parameter,
    and one parameter used only on some ranks."""

    def __init__(self):
        super().__init__()
        self.small = nn.ParameterList([nn.Parameter(torch.zeros(k)) for k in (1, 3, 7, 13, 1, 2)])
        self.big = nn.Parameter(torch.zeros(70_001))  # > the 64 KB buckets used below
        self.odd = nn.Parameter(torch.zeros(5, 3))
        self.unused = nn.Parameter(torch.zeros(4))
        self.sometimes = nn.Parameter(torch.zeros(6))


def rank_grads(model, rank, use_sometimes):
    """Loss whose gradient w.r.t. each parameter is (rank + 1) * known pattern."""
    loss = sum((p * torch.arange(p.numel(), dtype=p.dtype).view_as(p)).sum() * (rank + 1)
               for p in list(model.small) + [model.big, model.odd])
    if use_sometimes:
        loss = loss + (model.sometimes * (rank + 1)).sum()
    return loss


def chunked_mpi_reducer(comm, **kw):
    """The mpi reducer with every allreduce cut into odd 13-float slices."""
    from hpcaccel.comm.mpi import MPIReducer
    return MPIReducer(comm=comm, chunk_bytes=52, **kw)


@pytest.mark.quick
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "sliced"])
def test_mean_of_gradients_odd_sizes_many_tensors_and_big_tensor(make, contract_comm, backend,
                                                                  chunked):
    comm = contract_comm
    rank, size = comm.Get_rank(), comm.Get_size()
    if chunked and backend != "mpi":
        pytest.skip("slicing of large allreduces is the mpi reducer's")
    model = Many()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    red = (chunked_mpi_reducer(comm, bucket_bytes=64 * 1024) if chunked
           else make(comm=comm, bucket_bytes=64 * 1024))
    red.broadcast_parameters(model)
    red.attach(model, opt)
    for step in range(3):  # several steps: buffers are reused and must be cleared
        red.zero_grad()
        rank_grads(model, rank, use_sometimes=(rank == 0)).backward()
        red.synchronize()
        mean_factor = sum(r + 1 for r in range(size)) / size
        for p in list(model.small) + [model.big, model.odd]:
            expect = torch.arange(p.numel(), dtype=p.dtype).view_as(p) * mean_factor
            torch.testing.assert_close(p.grad, expect, rtol=1e-6, atol=1e-5)
        # used on rank 0 only: its gradient is averaged over all ranks, identical everywhere
        torch.testing.assert_close(model.sometimes.grad, torch.full((6,), 1.0 / size))
        # used nowhere: no gradient on any rank, so no rank updates it
        assert model.unused.grad is None
        opt.step()
    red.close()


@pytest.mark.quick
def test_parameters_stay_identical_across_ranks(make, contract_comm):
    comm = contract_comm
    torch.manual_seed(comm.Get_rank())  # different init per rank: broadcast must fix it
    model = nn.Sequential(nn.Linear(17, 33), nn.ReLU(), nn.Linear(33, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    red = make(comm=comm)
    red.broadcast_parameters(model)
    red.attach(model, opt)
    g = torch.Generator().manual_seed(100 + comm.Get_rank())  # different data per rank
    for _ in range(5):
        red.zero_grad()
        x = torch.randn(8, 17, generator=g)
        model(x).pow(2).mean().backward()
        red.synchronize()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()
    everyone = comm.allgather(flat)
    for other in everyone:
        np.testing.assert_array_equal(other, flat)
    red.close()


@pytest.mark.parametrize("op", ["sum", "max", "min"])
def test_allreduce_in_place_contiguous_and_strided(make, contract_comm, op):
    comm = contract_comm
    rank, size = comm.Get_rank(), comm.Get_size()
    red = make(comm=comm)
    try:
        t = torch.arange(7, dtype=torch.float32) + rank
        assert red.allreduce_(t, op) is t
        ranks = torch.arange(size, dtype=torch.float32)
        expect = {"sum": torch.arange(7) * size + ranks.sum(), "max": torch.arange(7) + size - 1,
                  "min": torch.arange(7).float()}[op]
        torch.testing.assert_close(t, expect.float())
        strided = (torch.ones(4, 6) * (rank + 1))[:, ::2]  # not contiguous: through a copy
        red.allreduce_(strided, "sum")
        assert torch.all(strided == size * (size + 1) / 2)
    finally:
        red.close()


def test_one_rank_communicator_keeps_the_contract(make, backend):
    """On a communicator of one rank (each rank's COMM_SELF here) nothing is communicated,
    but zero_grad, unused parameters and accumulation behave as at any size."""
    from mpi4py import MPI

    if backend == "horovod":
        pytest.skip("Horovod runs on one communicator per process (the job's, started earlier)")

    model = Many()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    red = make(comm=MPI.COMM_SELF)
    try:
        red.attach(model, opt)
        for _ in range(2):  # gradients must not leak from one step into the next
            red.zero_grad()
            with red.no_sync():
                rank_grads(model, 0, use_sometimes=False).backward()
            rank_grads(model, 0, use_sometimes=False).backward()
            red.synchronize()
            for p in list(model.small) + [model.big, model.odd]:
                expect = 2 * torch.arange(p.numel(), dtype=p.dtype).view_as(p)
                torch.testing.assert_close(p.grad, expect)
            assert model.unused.grad is None and model.sometimes.grad is None
            opt.step()
    finally:
        red.close()


def test_bucket_size_auto_is_the_same_on_every_rank_and_follows_the_checkpoint(comm):
    """--bucket-mb auto: one host keeps the fixed size (nothing measured); the probe's
    timings are the same on every rank, so every rank plans the same buckets; a checkpoint's
    size is adopted on load (same order of additions after a resume), and the reducer still
    averages exactly after re-planning."""
    from hpcaccel.comm import bucket_size
    from hpcaccel.comm.mpi import MPIReducer

    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)], nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    red = MPIReducer(comm=comm)  # bucket_bytes None: auto
    red.attach(model, opt)
    assert red.link is None and red.bucket_bytes == bucket_size.ONE_HOST_BYTES  # one host
    assert "buckets 25 MiB (auto: one host)" in red.describe()
    samples = bucket_size.probe(red.algorithm, red.comm)  # what a job across hosts measures
    assert [n for n, _ in samples] == list(bucket_size.PROBE_BYTES)
    assert comm.allgather(samples) == [samples] * comm.Get_size()
    size = bucket_size.choose(10 << 20, *bucket_size.fit_link(samples))
    assert bucket_size.SMALLEST <= size <= bucket_size.LARGEST
    assert red.state_dict()["bucket_bytes"] == red.bucket_bytes
    red.load_state_dict({"bucket_bytes": 64 * 1024}, exact=False)  # another world size's
    assert red.bucket_bytes == bucket_size.ONE_HOST_BYTES
    red.load_state_dict({"bucket_bytes": 64 * 1024})  # a checkpoint from a run that chose 64 KiB
    assert red.bucket_bytes == 64 * 1024 and len(red.buckets) >= 5  # a 256 KiB weight each
    assert "buckets 0.0625 MiB (auto: the checkpoint's)" in red.describe()
    rank = comm.Get_rank()
    x = torch.full((4, 256), float(rank + 1))
    model(x).sum().backward()
    red.synchronize()
    for p in model.parameters():  # every rank holds the same mean
        gathered = comm.allgather(p.grad.numpy())
        assert all(np.array_equal(gathered[0], other) for other in gathered)
    red.close()
    fixed = MPIReducer(comm=comm, bucket_bytes=1 << 20)
    fixed.attach(nn.Linear(4, 4), None)
    fixed.load_state_dict({"bucket_bytes": 64 * 1024})  # a fixed --bucket-mb is the user's
    assert fixed.bucket_bytes == 1 << 20 and fixed.link is None
    fixed.close()
