"""A training script of your own on hpcaccel.torch: Horovod's API (init, DistributedOptimizer,
parameter and optimizer-state broadcasts, metrics averaged with allreduce) plus hpcaccel's
own calls: RankData (this rank's part of an HDF5 dataset) and Job (checkpoints and resume,
a clean stop on Slurm's signal, the stall watchdog). docs/scripts.md explains every call.

    mpirun -np 2 python examples/hpcaccel_torch_script.py --out runs/example
    python -m hpcaccel.data pack --source arrays.npz --shards 8 --out /scratch/ds
    mpirun -np 8 python examples/hpcaccel_torch_script.py --data /scratch/ds/index.json \\
        --test-data test.h5 --stage-dir /tmp --out runs/mine
    python -m hpcaccel.slurm render cpu --set cores_per_socket=32 \\
        --script examples/hpcaccel_torch_script.py -- --epochs 20

SIGUSR1 (Slurm's warning before the time limit; mpirun forwards it) or SIGTERM to the ranks
while it trains: every rank stops after the same step, rank 0 writes a checkpoint, and the
script exits with code 3; the same command again continues from there, and ends with the
parameters an uninterrupted run ends with. Run in a Slurm template, the job requeues itself.
"""
import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import hpcaccel.torch as hvd


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits",
                   help="an HDF5 file, the index.json of a shard set, or digits / synthetic")
    p.add_argument("--test-data", help="an HDF5 evaluation set (the built-ins bring one)")
    # the Slurm templates export HPCACCEL_RUN_DIR, the same directory across requeues
    p.add_argument("--out", default=os.environ.get("HPCACCEL_RUN_DIR", "runs/example"))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=0.05, help="per rank: scaled by the ranks")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage-dir", help="node-local storage to copy the data to first")
    p.add_argument("--stall-timeout", type=float, default=300.0,
                   help="seconds without progress before the hang report ends the job")
    return p.parse_args()


def make_model(shape, classes):
    """A small CNN for images (channels, height, width), an MLP for anything else."""
    if len(shape) == 3:
        return nn.Sequential(
            nn.Conv2d(shape[0], 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, classes))
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 256), nn.ReLU(),
                         nn.Linear(256, classes))


@torch.no_grad()
def evaluate(model, data):
    """(loss, accuracy) over the whole test set: each rank scores its own part."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss, correct, samples
    for x, y in data.test_batches():
        out = model(x)
        sums += torch.tensor([F.cross_entropy(out, y, reduction="sum").item(),
                              (out.argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
    loss, correct, count = hvd.allreduce(sums, op=hvd.Sum, name="test_sums").tolist()
    model.train()
    return loss / count, correct / count


def main():
    args = parse_args()
    hvd.init()
    torch.manual_seed(args.seed)
    data = hvd.RankData(args.data, args.batch_size, epochs=args.epochs, seed=args.seed,
                        test=args.test_data, stage_dir=args.stage_dir)
    model = make_model(data.sample_shape, data.classes)
    # the global batch grows with the ranks, so the learning rate does (as in Horovod's
    # examples)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(),
                                momentum=args.momentum)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    with hvd.Job(args.out, model, optimizer, data=data, stall_timeout=args.stall_timeout) as job:
        start = job.resume()  # this run's newest checkpoint in --out, if there is one
        loss_sum = start.state.get("loss_sum", 0.0)  # this rank's sum over the epoch so far
        for epoch in range(start.epoch, args.epochs):
            for x, y in data.epoch(epoch):  # the resumed epoch starts at the saved step
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()  # the gradients are averaged over the ranks first
                loss_sum += loss.item()
                if job.should_stop():  # a stop signal on any rank: every rank stops here
                    job.checkpoint_and_exit({"loss_sum": loss_sum})  # exit code 3
            train_loss = hvd.allreduce(torch.tensor(loss_sum / data.steps),
                                       name="train_loss").item()  # the mean over ranks
            loss_sum = 0.0
            job.heartbeat("evaluation")
            test_loss, test_accuracy = evaluate(model, data)
            if hvd.rank() == 0:
                print(f"epoch {epoch + 1}/{args.epochs}  train loss {train_loss:.4f}  "
                      f"test loss {test_loss:.4f}  test accuracy {test_accuracy:.4f}",
                      flush=True)
            job.save()  # the epoch's end: a resume starts the next one
        if hvd.rank() == 0:
            torch.save(model.state_dict(), os.path.join(args.out, "model.pt"))
            print(f"done: model in {os.path.join(args.out, 'model.pt')}", flush=True)


if __name__ == "__main__":
    main()
