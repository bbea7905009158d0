"""Both backends give the same parameters and optimizer state, step for step, with every
optimizer hpcaccel offers. Real Horovod, real MPI; holds at any world size."""
import pytest
import torch

from dp_helpers import assert_same_on_every_rank, train
from support import requires_horovod as needs_horovod

pytestmark = pytest.mark.mpi(min_size=2)


@needs_horovod
@pytest.mark.parametrize("optimizer", ["sgd", "sgd-groups", "adamw", "lars"])
def test_both_backends_give_the_same_parameters(comm, optimizer):
    steps = 6
    mpi_model, mpi_opt = train("mpi", comm, steps, optimizer)
    hvd_model, hvd_opt = train("horovod", comm, steps, optimizer)
    for (name, a), b in zip(mpi_model.state_dict().items(), hvd_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{name} differs after {steps} steps")
    # The caller's optimizer owns the state under Horovod too (what checkpoints save).
    for a, b in zip(mpi_opt.state_dict()["state"].values(), hvd_opt.state_dict()["state"].values()):
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert_same_on_every_rank(comm, list(hvd_model.parameters()))
