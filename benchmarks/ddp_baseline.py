"""A plain torch DDP (gloo) training loop, written to current best practice, as the baseline
for hpcaccel's throughput. Standalone:

    mpirun -np 2 python benchmarks/ddp_baseline.py --data DATA.h5 --steps 50

Best practice here: the rank's share of the samples in memory (DistributedSampler
semantics, no per-sample HDF5 reads), gradient_as_bucket_view=True (no gradient copies),
zero_grad(set_to_none=True), default 25 MB buckets, one intra-op thread per rank when
ranks share cores.
"""
import argparse
import os
import socket
import time

import h5py
import numpy as np
import torch
import torch.distributed as dist


def init_gloo(rank: int, size: int, port: int) -> None:
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_share(path: str, rank: int, size: int, batch: int, steps: int, seed: int = 0):
    """This rank's batches for `steps` steps: a DistributedSampler-style shuffled share."""
    with h5py.File(path, "r") as f:
        n = len(f["y"])
        order = np.random.default_rng(seed).permutation(n)
        need = steps * batch * size
        idx = np.sort(order[rank:need:size]) if need <= n else np.sort(order[rank::size])
        x = torch.from_numpy(f["x"][idx].astype(np.float32))
        y = torch.from_numpy(f["y"][idx].astype(np.int64))
    return x, y


def train_ddp(model: torch.nn.Module, x, y, batch: int, steps: int, warmup: int):
    """Returns (seconds for `steps` timed steps, per-step seconds)."""
    ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    per_step = []
    n = len(y)
    for i in range(warmup + steps):
        s = (i * batch) % max(1, n - batch + 1)
        xb, yb = x[s:s + batch], y[s:s + batch]
        if i == warmup:
            dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(ddp(xb), yb).backward()
        opt.step()
        if i >= warmup:
            per_step.append(time.perf_counter() - t0)
    dist.barrier()
    return sum(per_step), per_step


def main():
    from mpi4py import MPI

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--hidden", default="6144,1024")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)
    init_gloo(rank, size, comm.bcast(free_port() if rank == 0 else None))
    x, y = load_share(args.data, rank, size, args.batch, args.steps)
    from hpcaccel.models import mlp
    torch.manual_seed(0)
    model = mlp(tuple(x.shape[1:]), int(y.max()) + 1, hidden=tuple(int(h) for h in args.hidden.split(",")))
    seconds, _ = train_ddp(model, x, y, args.batch, args.steps, warmup=3)
    if rank == 0:
        print(f"DDP gloo: {args.steps * args.batch * size / seconds:.0f} samples/s at {size} ranks")


if __name__ == "__main__":
    main()
