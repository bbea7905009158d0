"""Gradients on a 16-bit wire (fp16, bf16) on both backends: close to the fp32 mean,
identical on every rank, and really rounded (half the bytes travel)."""
import numpy as np
import pytest
import torch
from torch import nn

from dp_helpers import assert_same_on_every_rank
from hpcaccel.comm import make_reducer
from support import requires_horovod as needs_horovod

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.mark.parametrize("backend,compression", [
    ("mpi", "fp16"), ("mpi", "bf16"), ("mpi-nonblocking", "bf16"),
    pytest.param("horovod", "fp16", marks=needs_horovod)])
def test_16_bit_wire_is_close_to_the_fp32_mean(comm, backend, compression):
    rank, size = comm.Get_rank(), comm.Get_size()
    model = nn.ParameterList([nn.Parameter(torch.zeros(n)) for n in (5, 3000, 70_001)])
    g = torch.Generator().manual_seed(7 + rank)
    # positive gradients (no cancellation), so the error bound below is relative
    targets = [torch.empty(p.numel()).uniform_(0.5, 2.0, generator=g) for p in model]
    exact = [torch.from_numpy(np.mean(comm.allgather(t.double().numpy()), axis=0)).float()
             for t in targets]
    if backend == "mpi-nonblocking":  # the 16-bit sum progressed by MPI_Iallreduce
        from hpcaccel.comm.mpi import MPIReducer
        red = MPIReducer(comm, bucket_bytes=64 * 1024, overlap="nonblocking", compression=compression)
    else:
        red = make_reducer(backend, comm=comm, compression=compression, bucket_bytes=64 * 1024)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        red.attach(model, opt)
        for _ in range(2):
            red.zero_grad()
            sum((p * t).sum() for p, t in zip(model, targets)).backward()
            red.synchronize()
            # each rank's value rounded once, each partial sum once, the mean (Horovod) once
            eps = torch.finfo(torch.float16 if compression == "fp16" else torch.bfloat16).eps
            for p, want in zip(model, exact):
                torch.testing.assert_close(p.grad, want, rtol=(size + 1) * eps, atol=0)
            assert_same_on_every_rank(comm, [p.grad for p in model])
            big = model[2].grad
            assert not torch.equal(big, exact[2]), "gradients did not travel in 16 bits"
            opt.step()
    finally:
        red.close()
