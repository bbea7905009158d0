"""Run under mpirun by test_torch_vs_horovod.py, once with real Horovod and once with
hpcaccel.torch (never both in one process: Horovod's background thread would share it):
the same small trainings through `hvd` with per-rank data; rank 0 saves every run's
initial and final parameters to OUT.

    python torch_vs_horovod_train.py horovod|hpcaccel OUT
"""
import sys

import torch
from torch import nn

which, out = sys.argv[1], sys.argv[2]
if which == "horovod":
    import horovod.torch as hvd
else:
    import hpcaccel.torch as hvd

hvd.init()
rank = hvd.rank()
torch.set_num_threads(1)


class Net(nn.Module):
    """`side` is used on rank 0 only: the other ranks contribute zeros for it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)
        self.side = nn.Linear(12, 3)

    def forward(self, x, use_side):
        y = self.head(self.body(x))
        return y + self.side(x) if use_side else y


RUNS = {
    "sgd-momentum": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), {}),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=0.01), {}),
    "adam-predivide": (lambda ps: torch.optim.Adam(ps, lr=0.01),
                       {"gradient_predivide_factor": 2.0}),
    "sgd-sum-2-passes": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                         {"op": hvd.Sum, "backward_passes_per_step": 2}),
    "sgd-fp16": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                 {"compression": hvd.Compression.fp16}),
}


def train(make_optimizer, options, steps=6):
    torch.manual_seed(1234 + rank)  # a different start per rank: broadcast_parameters fixes it
    model = Net()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = hvd.DistributedOptimizer(make_optimizer(model.parameters()),
                                   named_parameters=model.named_parameters(), **options)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    g = torch.Generator().manual_seed(99 + rank)  # different data on every rank
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(options.get("backward_passes_per_step", 1)):
            x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
            nn.functional.cross_entropy(model(x, rank == 0), y).backward()
        opt.step()
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key, value in final.items():  # averaged gradients: every rank holds rank 0's model
        assert torch.equal(hvd.broadcast(value, root_rank=0, name=key), value), key
    return initial, final


results = {name: train(*run) for name, run in RUNS.items()}
if rank == 0:
    torch.save(results, out)
hvd.shutdown()
