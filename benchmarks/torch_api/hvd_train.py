"""A Horovod training script as users write them (Horovod's own PyTorch examples:
init, DistributedOptimizer over named_parameters, broadcast of parameters and optimizer
state, SGD), on synthetic data with a fixed seed, timing samples/s after warm-up.
Written once against `import horovod.torch as hvd` and run unchanged two ways:

    mpirun -np 2 python benchmarks/torch_api/hvd_train.py --model mlp25m          # Horovod
    mpirun -np 2 python -m hpcaccel.horovod benchmarks/torch_api/hvd_train.py ...  # hpcaccel.torch

benchmarks/torch_api/run.py runs it both ways beside the same model under torch DDP
(ddp_train.py). Rank 0 writes --out (JSON): samples/s over the timed steps (the slowest
rank's time), each step's time on rank 0 and its median split into forward, backward
(during which the gradients' allreduces start) and step (which waits for them, then
updates), the last loss and a checksum of the final parameters.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import horovod.torch as hvd
from bench_models import MODELS, build_model, parameter_checksum, synthetic_batches


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="mlp25m")
    p.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--out", default=None, help="JSON written by rank 0")
    args = p.parse_args()

    hvd.init()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    batches = synthetic_batches(args.batch, hvd.rank(), args.seed)
    model.train()
    step_seconds, loss = [], None
    phases = {"forward": [], "backward": [], "step": []}
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            hvd.barrier()
            start = time.perf_counter()
        t0 = time.perf_counter()
        x, y = batches[i % len(batches)]
        optimizer.zero_grad()
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
    elapsed = time.perf_counter() - start
    elapsed = hvd.allreduce(torch.tensor(elapsed, dtype=torch.float64), op=hvd.Max,
                            name="elapsed").item()
    checksum = parameter_checksum(model)
    if hvd.rank() == 0 and args.out:
        with open(args.out, "w") as fh:
            json.dump({"samples_per_second": args.steps * args.batch * hvd.size() / elapsed,
                       "seconds": elapsed, "step_seconds": step_seconds,
                       "phase_seconds": {k: statistics.median(v) for k, v in phases.items()},
                       "size": hvd.size(),
                       "last_loss": loss.item(), "parameter_checksum": checksum,
                       "torch": torch.__version__, "threads": torch.get_num_threads()}, fh)
    hvd.shutdown()


if __name__ == "__main__":
    main()
