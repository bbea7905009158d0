"""--compression powersgd in the mpi reducer, across real ranks: identical gradients and
parameters on every rank, the exact mean where the mean has rank <= R, exact steps before
start_step, unused parameters, and state that continues a run exactly."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from dp_helpers import assert_same_on_every_rank
from hpcaccel.comm.mpi import MPIReducer

pytestmark = pytest.mark.mpi(min_size=2)


class Net(nn.Module):
    """A conv kernel and matrices PowerSGD compresses, biases it does not, and a branch
    (`spare`) used only on the ranks that ask for it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 16, 3)          # 16 x 18: compressed at rank 2
        self.fc1 = nn.Linear(16 * 4 * 4, 64)     # 64 x 256: compressed
        self.fc2 = nn.Linear(64, 5)              # 5 x 64: too thin, sent exactly
        self.spare = nn.Linear(64, 64)           # compressed; unused unless asked

    def forward(self, x, use_spare=False):
        h = torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1)))
        if use_spare:
            h = torch.tanh(self.spare(h))
        return self.fc2(h)


def batch(comm, step):
    g = torch.Generator().manual_seed(100 * step + comm.Get_rank())
    return torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


def steps(red, model, opt, comm, first, last, spare_on=()):
    for step in range(first, last):
        x, y = batch(comm, step)
        red.zero_grad()
        use = comm.Get_rank() in spare_on
        nn.functional.cross_entropy(model(x, use), y).backward()
        red.synchronize()
        opt.step()


def build(comm, **kw):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    red = MPIReducer(comm, compression="powersgd", bucket_bytes=32 * 1024, **kw)
    red.broadcast_parameters(model)
    red.attach(model, opt)
    return model, opt, red


@pytest.mark.parametrize("overlap", ["thread", "none"])
def test_parameters_identical_on_every_rank(comm, overlap):
    model, opt, red = build(comm, powersgd_rank=2, overlap=overlap)
    try:
        assert any(b.psgd is not None for b in red.buckets)
        assert any(b.psgd is None for b in red.buckets)
        steps(red, model, opt, comm, 0, 6, spare_on={0})
        assert_same_on_every_rank(comm, list(model.parameters()))
        assert red.powersgd.step == 6
    finally:
        red.close()


def test_mean_of_rank_one_gradients_is_exact_at_full_rank(comm):
    """Each rank's gradient has rank 1, so the mean has rank <= world size <= R: PowerSGD
    recovers it exactly, in one step, from a random start."""
    size, rank = comm.Get_size(), comm.Get_rank()
    r = max(4, size)
    w = nn.Parameter(torch.zeros(60, 40))
    g = torch.Generator().manual_seed(rank)
    u, v = torch.randn(60, generator=g), torch.randn(40, generator=g)
    mine = torch.outer(u, v)
    exact = torch.from_numpy(np.mean(comm.allgather(mine.double().numpy()), axis=0)).float()
    red = MPIReducer(comm, compression="powersgd", powersgd_rank=r)
    try:
        red.attach(nn.ParameterList([w]), torch.optim.SGD([w], lr=0.1))
        assert red.buckets[0].psgd is not None
        red.zero_grad()
        (w * mine).sum().backward()
        red.synchronize()
        torch.testing.assert_close(w.grad, exact, atol=1e-4, rtol=1e-4)
        assert_same_on_every_rank(comm, [w.grad])
    finally:
        red.close()


def test_exact_before_start_step_then_compressed(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    w = nn.Parameter(torch.zeros(64, 64))
    red = MPIReducer(comm, compression="powersgd", powersgd_rank=1, powersgd_start_step=2)
    try:
        red.attach(nn.ParameterList([w]), torch.optim.SGD([w], lr=0.1))
        for step in range(3):
            target = torch.randn(64, 64, generator=torch.Generator().manual_seed(10 * step + rank))
            exact = torch.from_numpy(np.mean(comm.allgather(target.double().numpy()), axis=0)).float()
            red.zero_grad()
            (w * target).sum().backward()
            red.synchronize()
            close = torch.allclose(w.grad, exact, atol=1e-5, rtol=1e-5)
            assert close == (step < 2), f"step {step}"  # a full-rank mean at rank 1: lossy
            assert_same_on_every_rank(comm, [w.grad])
    finally:
        red.close()


def test_unused_parameters(comm):
    """Unused on every rank: .grad None everywhere (and its state kept). Used on rank 0 only:
    averaged with the others' zeros, still identical on every rank."""
    model, opt, red = build(comm, powersgd_rank=2)
    try:
        steps(red, model, opt, comm, 0, 1)
        assert model.spare.weight.grad is None and model.spare.bias.grad is None
        assert model.fc1.weight.grad is not None
        steps(red, model, opt, comm, 1, 2, spare_on={0})
        assert model.spare.weight.grad is not None
        assert_same_on_every_rank(comm, [p.grad for p in model.parameters()])
    finally:
        red.close()


def test_state_dict_continues_a_run_exactly(comm):
    """Reducer state (error feedback, Q, step) saved after 4 steps and loaded into a fresh
    reducer: the next steps give bitwise the same parameters as never stopping."""
    model, opt, red = build(comm, powersgd_rank=2, powersgd_start_step=1)
    try:
        steps(red, model, opt, comm, 0, 4, spare_on={1})
        saved = (red.state_dict(), {k: v.clone() for k, v in model.state_dict().items()},
                 copy.deepcopy(opt.state_dict()))  # momentum buffers change in place
        steps(red, model, opt, comm, 4, 8, spare_on={1})
    finally:
        red.close()
    model2, opt2, red2 = build(comm, powersgd_rank=2, powersgd_start_step=1)
    try:
        model2.load_state_dict(saved[1])
        opt2.load_state_dict(saved[2])
        red2.load_state_dict(saved[0])
        steps(red2, model2, opt2, comm, 4, 8, spare_on={1})
        for (name, a), b in zip(model.named_parameters(), model2.parameters()):
            assert torch.equal(a, b), name
    finally:
        red2.close()


def test_nonblocking_overlap_is_refused(comm):
    with pytest.raises(ValueError, match="powersgd"):
        MPIReducer(comm, compression="powersgd", overlap="nonblocking")
