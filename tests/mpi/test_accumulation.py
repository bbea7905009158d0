"""Gradient accumulation on both backends: K micro-batches under no_sync equal one
backward over all of them, and the Trainer's --accum-steps equals a K times larger batch."""
import types

import numpy as np
import pytest
import torch
from torch import nn

from dp_helpers import assert_same_on_every_rank, rank_batch, small_net
from hpcaccel.config import TrainConfig
from hpcaccel.control import ControlPlane
from hpcaccel.trainer import Trainer

pytestmark = pytest.mark.mpi(min_size=2)


class TwoPaths(nn.Module):
    """`extra` is used only where asked; `unused` never."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Linear(6, 5)
        self.extra = nn.Linear(6, 5)
        self.unused = nn.Parameter(torch.zeros(3))

    def forward(self, x, use_extra):
        return self.body(x) + self.extra(x) if use_extra else self.body(x)


@pytest.mark.parametrize("k", [2, 3])
def test_no_sync_accumulation_equals_one_backward_over_all_micro_batches(make, comm, k):
    """k micro-batches, the first k-1 under no_sync; `extra` gets gradients only in the first
    micro-batch and only on rank 0, so the last backward never produces it (Horovod must
    start its allreduce in synchronize, with zeros from the other ranks)."""
    rank = comm.Get_rank()
    g = torch.Generator().manual_seed(rank)
    micro = [torch.randn(4, 6, generator=g) for _ in range(k)]
    uses = [i == 0 and rank == 0 for i in range(k)]

    def run(accumulate):
        model = TwoPaths()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        red = make()
        try:
            red.broadcast_parameters(model)
            red.attach(model, opt)
            for _ in range(2):  # twice: the accumulation state must reset between steps
                red.zero_grad()
                if accumulate:
                    for i, (x, use) in enumerate(zip(micro, uses)):
                        if i < k - 1:
                            with red.no_sync():
                                model(x, use).pow(2).mean().backward()
                        else:
                            model(x, use).pow(2).mean().backward()
                else:  # one graph, one backward: the reference
                    sum(model(x, use).pow(2).mean() for x, use in zip(micro, uses)).backward()
                red.synchronize()
                grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
                opt.step()
        finally:
            red.close()
        return model, grads

    ref_model, ref_grads = run(accumulate=False)
    acc_model, acc_grads = run(accumulate=True)
    assert acc_grads["unused"] is None and ref_grads["unused"] is None
    assert acc_grads["extra.weight"] is not None  # produced on rank 0 only, averaged everywhere
    for name, ref in ref_grads.items():
        if ref is not None:
            torch.testing.assert_close(acc_grads[name], ref, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(ref_model.state_dict().items(), acc_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert_same_on_every_rank(comm, list(acc_model.parameters()))


@pytest.mark.parametrize("k", [2, 4])
def test_trainer_accum_steps_equals_one_step_with_k_times_the_micro_batch(make, comm, k):
    """Trainer.forward_backward with --accum-steps k over a batch of k micro-batches gives the
    parameters of plain steps over the whole batch (no BatchNorm: its statistics are per pass)."""
    micro_batch, steps = 3, 3

    def run(accum_steps):
        model = small_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        red = make()
        cfg = TrainConfig(batch_size=k * micro_batch, accum_steps=accum_steps)
        reader = types.SimpleNamespace(steps=steps)  # only its length is used here
        trainer = Trainer(cfg, ControlPlane(comm), red, model, opt, reader)
        losses = []
        try:
            red.broadcast_parameters(model)
            red.attach(model, opt)
            for step in range(steps):
                x, y = rank_batch(comm, step, n=k * micro_batch)
                red.zero_grad()
                loss, _ = trainer.forward_backward(x, y)
                red.synchronize()
                opt.step()
                losses.append(float(loss))
        finally:
            red.close()
        return model, losses

    ref_model, ref_losses = run(1)
    acc_model, acc_losses = run(k)
    np.testing.assert_allclose(acc_losses, ref_losses, rtol=1e-5)
    for (name, a), b in zip(ref_model.state_dict().items(), acc_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
