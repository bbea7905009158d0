"""Fine-tuning with a frozen backbone on both backends: frozen parameters get no gradient
and never change; the trained head stays identical on every rank."""
import pytest
import torch

from dp_helpers import assert_same_on_every_rank, run_steps, small_net

pytestmark = pytest.mark.mpi(min_size=2)


def test_frozen_parameters_fine_tuning(make, comm):
    """A frozen backbone (requires_grad False, not in the optimizer) and a trained head."""
    model = small_net()
    for p in model[0].parameters():
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    run_steps(make(), model, opt, comm, 3)
    assert all(p.grad is None for p in model[0].parameters())
    for p, before in zip(model[0].parameters(), frozen):
        assert torch.equal(p.detach(), before)
    assert_same_on_every_rank(comm, list(model.parameters()))
