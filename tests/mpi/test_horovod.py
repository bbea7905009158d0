"""The Horovod backend against the mpi4py one, gradient accumulation and compression on
both, and how the backend is chosen. Real Horovod, real MPI; every assertion holds at any
world size."""
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from hpcaccel.comm import horovod_unavailable, make_reducer
from hpcaccel.config import TrainConfig
from hpcaccel.env import World
from hpcaccel.errors import UsageError
from hpcaccel.trainer import Trainer

pytestmark = pytest.mark.mpi(min_size=2)

WHY_NO_HOROVOD = horovod_unavailable()
needs_horovod = pytest.mark.skipif(WHY_NO_HOROVOD is not None,
                                   reason=f"Horovod not usable: {WHY_NO_HOROVOD}")
BOTH = ["mpi", pytest.param("horovod", marks=needs_horovod)]


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))


def rank_batch(comm, step, n=8):
    """Different data on every rank and step, the same on every backend."""
    g = torch.Generator().manual_seed(1000 * step + comm.Get_rank())
    return torch.randn(n, 10, generator=g), torch.randint(0, 4, (n,), generator=g)


def make_optimizer(name, model):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    if name == "sgd-groups":  # weight decay on weights only, as for decay-exempt biases
        weights = [p for p in model.parameters() if p.ndim > 1]
        biases = [p for p in model.parameters() if p.ndim <= 1]
        return torch.optim.SGD([{"params": weights, "weight_decay": 1e-2}, {"params": biases}],
                               lr=0.1, momentum=0.9, nesterov=True)
    if name == "lars":
        from hpcaccel.optim import LARS
        return LARS(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    return torch.optim.AdamW(model.parameters(), lr=0.01)


def run_steps(red, model, opt, comm, steps):
    """Plain data-parallel steps on each rank's own batch; closes the reducer."""
    try:
        red.broadcast_parameters(model)
        red.attach(model, opt)
        for step in range(steps):
            x, y = rank_batch(comm, step)
            red.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            red.synchronize()
            red.step()
    finally:
        red.close()


def train(backend, comm, steps, optimizer="sgd", **options):
    model = small_net()
    opt = make_optimizer(optimizer, model)
    run_steps(make_reducer(backend, comm=comm, **options), model, opt, comm, steps)
    return model, opt


def assert_same_on_every_rank(comm, tensors):
    flat = torch.cat([t.detach().flatten() for t in tensors]).numpy()
    for other in comm.allgather(flat):
        np.testing.assert_array_equal(other, flat)


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
                red.step()
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
        world = World(comm.Get_rank(), comm.Get_size(), 0, 1, 1, "test", 1, "")
        reader = types.SimpleNamespace(steps=steps)  # only its length is used here
        trainer = Trainer(cfg, world, red, model, opt, reader, None, None, None, None, None)
        losses = []
        try:
            red.broadcast_parameters(model)
            red.attach(model, opt)
            for step in range(steps):
                x, y = rank_batch(comm, step, n=k * micro_batch)
                red.zero_grad()
                loss, _ = trainer.forward_backward(x, y)
                red.synchronize()
                red.step()
                losses.append(float(loss))
        finally:
            red.close()
        return model, losses

    ref_model, ref_losses = run(1)
    acc_model, acc_losses = run(k)
    np.testing.assert_allclose(acc_losses, ref_losses, rtol=1e-5)
    for (name, a), b in zip(ref_model.state_dict().items(), acc_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


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
    try:
        red.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
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
            red.step()
    finally:
        red.close()


@pytest.mark.parametrize("backend", BOTH)
def test_broadcast_optimizer_state(comm, backend):
    rank = comm.Get_rank()
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    red = make_reducer(backend, comm=comm)
    try:
        red.attach(model, opt)
        before = [p.detach().clone() for p in model.parameters()]
        red.broadcast_optimizer_state()  # nothing to broadcast yet: parameters untouched
        for p, b in zip(model.parameters(), before):
            torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
        # a local, rank-dependent step: momentum buffers now differ between ranks
        for p in model.parameters():
            p.grad = torch.full_like(p, float(rank + 1))
        opt.step()
        red.broadcast_optimizer_state()
        buffers = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
        assert_same_on_every_rank(comm, buffers)
        torch.testing.assert_close(buffers[0], torch.ones_like(buffers[0]) + 0.1 * before[0],
                                   rtol=1e-6, atol=1e-6)  # rank 0's: grad 1 + weight decay
    finally:
        red.close()


@needs_horovod
def test_horovod_reducer_after_close_leaves_the_model_usable(comm):
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    red = make_reducer("horovod", comm=comm)
    red.attach(model, opt)
    red.close()
    red.close()  # idempotent
    model(torch.randn(2, 10)).sum().backward()  # Horovod's hooks are inert now
    assert all(p.grad is not None for p in model.parameters())


@needs_horovod
def test_horovod_knobs_cannot_change_once_horovod_runs(comm):
    """Horovod reads its knobs once per process (tests/integration checks they take effect)."""
    make_reducer("horovod", comm=comm).close()  # Horovod runs now, with default knobs
    with pytest.raises(RuntimeError, match="HOROVOD_CYCLE_TIME cannot change"):
        make_reducer("horovod", comm=comm, cycle_time_ms=5.0)


def test_auto_uses_horovod_where_it_is_usable(comm):
    red = make_reducer("auto", comm=comm)
    try:
        assert red.name == ("horovod" if WHY_NO_HOROVOD is None else "mpi")
    finally:
        red.close()


def test_without_horovod_auto_falls_back_and_explicit_is_a_usage_error(comm, monkeypatch, capfd):
    # None in sys.modules makes `import horovod.torch` fail, as on a machine without it.
    monkeypatch.setitem(sys.modules, "horovod", None)
    monkeypatch.setitem(sys.modules, "horovod.torch", None)
    assert horovod_unavailable().startswith("horovod.torch does not import")
    capfd.readouterr()
    red = make_reducer("auto", comm=comm)
    red.close()
    assert red.name == "mpi"
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == (1 if comm.Get_rank() == 0 else 0)
    assert "--backend mpi" in "".join(warnings) or comm.Get_rank() != 0
    with pytest.raises(UsageError, match=r"^--backend horovod: not usable") as err:
        make_reducer("horovod", comm=comm)
    assert "\n" not in str(err.value)


@needs_horovod
def test_horovod_has_no_bf16_wire(comm):
    with pytest.raises(UsageError, match="bf16"):
        make_reducer("horovod", comm=comm, compression="bf16")


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


@needs_horovod
def test_horovod_allreduce_in_place(comm):
    size = comm.Get_size()
    red = make_reducer("horovod", comm=comm)
    try:
        t = torch.full((1000,), float(comm.Get_rank() + 1))
        assert red.allreduce_(t) is t
        torch.testing.assert_close(t, torch.full((1000,), size * (size + 1) / 2))
        assert red.allreduce_(torch.tensor([float(comm.Get_rank())]), "max").item() == size - 1
    finally:
        red.close()
