"""Helpers of the MPI tests: a small net, per-rank batches, plain data-parallel steps."""
import numpy as np
import torch
from torch import nn

from hpcaccel.comm import make_reducer


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))


def rank_batch(comm, step, n=8):
    """Different data on every rank and step, the same on every backend."""
    g = torch.Generator().manual_seed(1000 * step + comm.Get_rank())
    return torch.randn(n, 10, generator=g), torch.randint(0, 4, (n,), generator=g)


def make_test_optimizer(name, model):
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
            opt.step()
    finally:
        red.close()


def train(backend, comm, steps, optimizer="sgd", **options):
    model = small_net()
    opt = make_test_optimizer(optimizer, model)
    run_steps(make_reducer(backend, comm=comm, **options), model, opt, comm, steps)
    return model, opt


def assert_same_on_every_rank(comm, tensors):
    flat = torch.cat([t.detach().flatten() for t in tensors]).numpy()
    for other in comm.allgather(flat):
        np.testing.assert_array_equal(other, flat)


def fit_in_process(cfg, control, model, task, train, test, backend="mpi", shuffle=False,
                   check_reader=None):
    """The training loop in this process on control's communicator, as hpcaccel.train runs
    it: a reducer of `backend`, rank 0's parameters broadcast, Trainer.fit(). Returns the
    metrics records (every epoch's, as the run's log would hold them)."""
    from hpcaccel.data import RankReader
    from hpcaccel.metrics import NullRunLog
    from hpcaccel.optim import make_optimizer
    from hpcaccel.trainer import LoopHooks, Trainer

    class Records(NullRunLog):
        def __init__(self):
            self.records = []

        def metrics(self, record):
            self.records.append(record)

    comm = control.comm
    optimizer = make_optimizer(cfg, model)
    reducer = make_reducer(backend, comm=comm)
    reader = RankReader(train, comm.Get_rank(), comm.Get_size(), cfg.batch_size, shuffle, 0)
    if check_reader is not None:
        check_reader(reader)
    log = Records()
    try:
        reducer.broadcast_parameters(model)
        reducer.attach(model, optimizer)
        Trainer(cfg, control, reducer, model, optimizer, reader, test, LoopHooks(log=log),
                task).fit()
    finally:
        reducer.close()
    return log.records
