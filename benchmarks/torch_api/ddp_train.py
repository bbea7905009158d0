"""The Horovod script's model and data (hvd_train.py, bench_models.py) under torch DDP over
gloo, written to DDP's best practice: gradient_as_bucket_view=True, zero_grad to None,
default 25 MB buckets, one intra-op thread per rank. Launched by mpirun like the others;
MPI only tells each rank its rank, the world size and rank 0's address (its host address
over eth0 when the ranks span hosts, loopback on one host). Writes what hvd_train.py
writes; DDP's backward includes the wait for its last buckets, its step only updates.

    mpirun -np 2 python benchmarks/torch_api/ddp_train.py --model mlp25m --out ddp.json
"""
import argparse
import json
import statistics
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench_models import MODELS, build_model, parameter_checksum, synthetic_batches


def init_gloo(comm=None):
    """torch.distributed over gloo: rank 0's host address over eth0 across hosts, loopback
    on one host. Returns (rank, size, number of hosts). benchmarks/sharding uses it too."""
    from mpi4py import MPI

    comm = comm or MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    hosts = len(set(comm.allgather(MPI.Get_processor_name())))
    addr = "127.0.0.1"
    if hosts > 1:
        addr = comm.bcast(socket.gethostbyname(socket.gethostname()))
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0")
    port = None
    if rank == 0:
        with socket.socket() as s:
            s.bind((addr, 0))
            port = s.getsockname()[1]
    port = comm.bcast(port)
    dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=size)
    return rank, size, hosts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="mlp25m")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    rank, size, _ = init_gloo()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = torch.nn.parallel.DistributedDataParallel(build_model(args.model),
                                                      gradient_as_bucket_view=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    batches = synthetic_batches(args.batch, rank, args.seed)
    model.train()
    step_seconds, loss = [], None
    phases = {"forward": [], "backward": [], "step": []}
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            dist.barrier()
            start = time.perf_counter()
        t0 = time.perf_counter()
        x, y = batches[i % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        if i >= args.warmup:
            step_seconds.append(t3 - t0)
            for phase, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[phase].append(seconds)
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    checksum = parameter_checksum(model.module)
    if rank == 0 and args.out:
        with open(args.out, "w") as fh:
            json.dump({"samples_per_second": args.steps * args.batch * size / elapsed.item(),
                       "seconds": elapsed.item(), "step_seconds": step_seconds,
                       "phase_seconds": {k: statistics.median(v) for k, v in phases.items()},
                       "size": size,
                       "last_loss": loss.item(), "parameter_checksum": checksum,
                       "torch": torch.__version__, "threads": torch.get_num_threads()}, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
