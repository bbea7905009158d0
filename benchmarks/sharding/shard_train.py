"""One MPI job of the sharding benchmark (benchmarks/sharding/run.py launches it): a few
training steps of one model with AdamW, either through hpcaccel's own Trainer on the mpi
reducer with --shard none|optimizer|gradients (built the way hpcaccel/train.py builds it:
make_reducer with reducer_options(cfg), make_optimizer, broadcast_parameters, attach,
Trainer.train_step), or under torch DDP over gloo (variant ddp: gradient_as_bucket_view,
default 25 MB buckets, the same model, optimizer and batches).

Measures per rank, written by rank 0 to --out as JSON:
  * model-state bytes counted from the tensors (each storage once): parameters (and
    buffers), gradients as held after a step (the reducer's bucket buffers, its gradient
    pool and kept parts with --shard gradients, DDP's buckets, or autograd's .grad at one
    rank), optimizer state (the optimizer's own, or reducer.sharded's pieces';
    reducer.sharded.state_bytes() is recorded beside it)
  * VmHWM (peak resident memory) of the process right before the model is built and after
    the steps, and VmRSS after
  * the optimizer-step span (Trainer.apply_update: with sharding the sharded step and the
    queueing of the allgathers; DDP: optimizer.step), each step's wall time, samples/s over
    the timed steps (slowest rank's clock), and the parameters' checksum

--timeline FILE (mpi variants): hpcaccel's Chrome-trace timeline of the timed steps, the
same Timeline object `--timeline` gives the reducer and the loop, plus two span kinds this
script adds: "forward" (the model's whole forward) and "forward_wait_allgather" (a forward
pre-hook of the reducer waiting for a bucket's allgather).

    mpirun -np 2 python benchmarks/sharding/shard_train.py --variant optimizer --model mlp25m --out x.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHAPE = (3, 32, 32)
CLASSES = 10
VARIANTS = ("none", "optimizer", "gradients", "ddp")


def build_model(name: str):
    from hpcaccel.models import cnn, mlp

    if name == "mlp19m":  # 3072-2048-2048-2048-2048-10, 18.9M parameters
        return mlp(SHAPE, (CLASSES,), hidden=(2048, 2048, 2048, 2048))
    if name == "mlp25m":  # 3072-6144-1024-10, 25.2M parameters
        return mlp(SHAPE, (CLASSES,), hidden=(6144, 1024))
    if name == "cnn":     # the built-in CNN (hpcaccel.models.cnn), as --model cnn builds it
        return cnn(SHAPE, (CLASSES,))
    raise ValueError(f"unknown model {name!r}")


MODELS = ("mlp19m", "mlp25m", "cnn")


def proc_status() -> dict:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Counter:
    """Bytes of tensors, each underlying storage counted once across all categories."""

    def __init__(self):
        self.seen = set()

    def __call__(self, tensors) -> int:
        import torch

        total = 0
        for t in tensors:
            if t is None or not torch.is_tensor(t):
                continue
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key in self.seen or st.nbytes() == 0:
                continue
            self.seen.add(key)
            total += st.nbytes()
        return total


def state_tensors(optimizer):
    import torch
    return [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]


def model_state_bytes(model, optimizer, reducer=None, ddp=None) -> dict:
    """Parameters, gradients and optimizer state held by this rank now, from the tensors."""
    count = Counter()
    params = list(model.parameters())
    out = {"parameters": count(params + list(model.buffers()))}
    grads = []
    if reducer is not None:
        for b in reducer.buckets:
            grads += [b.flat, b.kept, b.wire]
        grads += list(getattr(reducer, "_pool", []))
    grads += [p.grad for p in params]
    out["gradients"] = count(grads)
    opt = state_tensors(optimizer)
    sharded = getattr(reducer, "sharded", None) if reducer is not None else None
    if sharded is not None:
        for inner in sharded.optimizers():
            opt += state_tensors(inner)
    out["optimizer_state"] = count(opt)
    if sharded is not None:
        out["sharded_state_bytes"] = sharded.state_bytes()
    if reducer is not None:
        out["buckets"] = len(reducer.buckets)
        out["pool_buffers"] = len(getattr(reducer, "_pool", []))
    out["total"] = out["parameters"] + out["gradients"] + out["optimizer_state"]
    return out


def synthetic_batches(batch: int, rank: int, seed: int = 0, count: int = 4):
    import torch
    g = torch.Generator().manual_seed(seed * 100_003 + rank)
    return [(torch.randn((batch, *SHAPE), generator=g),
             torch.randint(0, CLASSES, (batch,), generator=g)) for _ in range(count)]


def checksum(model) -> float:
    import torch
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))


def init_gloo(comm):
    """torch.distributed over gloo, as benchmarks/torch_api/ddp_train.py starts it."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "torch_api"))
    from ddp_train import init_gloo as start
    return start(comm)[2]


def add_forward_spans(model, reducer, timeline):
    """Timeline spans of the whole forward and of the reducer's forward pre-hooks waiting
    for a bucket's allgather (benchmark instrumentation, not part of hpcaccel)."""
    started = {}

    def pre(_m, _inputs):
        started["t"] = time.perf_counter()

    def post(_m, _inputs, _out):
        timeline.add("forward", started.pop("t"), time.perf_counter())

    model.register_forward_pre_hook(pre)
    model.register_forward_hook(post)
    original = reducer._await_values

    def awaited(buckets):
        buckets = list(buckets)
        pending = [b.index for b in buckets if not b.gathered.is_set()]
        t0 = time.perf_counter()
        original(buckets)
        if pending:
            timeline.add("forward_wait_allgather", t0, time.perf_counter(), buckets=pending)
    reducer._await_values = awaited


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--model", choices=MODELS, default="mlp25m")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bucket-mb", default="auto")
    p.add_argument("--timeline", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(args.threads)
    hosts = len(set(comm.allgather(MPI.Get_processor_name())))
    from hpcaccel.config import TrainConfig
    from hpcaccel.optim import make_optimizer

    cfg = TrainConfig(batch_size=args.batch, lr=args.lr, optimizer="adamw", backend="mpi",
                      shard="none" if args.variant == "ddp" else args.variant,
                      bucket_mb=args.bucket_mb, threads=args.threads, progress="off")
    reducer = trainer = ddp = timeline = None
    if args.variant == "ddp":
        init_gloo(comm)
        hwm_before = proc_status()["VmHWM"]
        torch.manual_seed(0)
        model = build_model(args.model)
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        optimizer = make_optimizer(cfg, model)
    else:
        from hpcaccel.comm import make_reducer, reducer_options
        from hpcaccel.control import ControlPlane
        from hpcaccel.timeline import NullTimeline, Timeline
        from hpcaccel.trainer import LoopHooks, Trainer

        control = ControlPlane(comm)
        timeline = Timeline(args.timeline, control) if args.timeline else NullTimeline()
        reducer = make_reducer(cfg.backend, comm=comm, timeline=timeline, **reducer_options(cfg))
        hwm_before = proc_status()["VmHWM"]
        torch.manual_seed(0)
        model = build_model(args.model)
        optimizer = make_optimizer(cfg, model)
        reducer.broadcast_parameters(model)
        reducer.attach(model, optimizer)
        if args.timeline:
            add_forward_spans(model, reducer, timeline)
        reader = types.SimpleNamespace(steps=args.warmup + args.steps, wait_seconds=0.0)
        trainer = Trainer(cfg, control, reducer, model, optimizer, reader,
                          hooks=LoopHooks(timeline=timeline))
    batches = synthetic_batches(args.batch, rank)
    model.train()

    step_spans, step_seconds = [], []
    if trainer is not None:
        plain_update = trainer.apply_update

        def timed_update():
            t = time.perf_counter()
            plain_update()
            step_spans.append(time.perf_counter() - t)
        trainer.apply_update = timed_update

    def one_step(i):
        x, y = batches[i % len(batches)]
        if trainer is not None:
            trainer.train_step(x, y)
            return
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        t = time.perf_counter()
        optimizer.step()
        step_spans.append(time.perf_counter() - t)

    for i in range(args.warmup):
        one_step(i)
    del step_spans[:]
    if timeline is not None:
        timeline.start()  # collective: the trace's clock starts at the timed steps
    compute0 = dict(trainer.timers) if trainer is not None else None
    comm.Barrier()
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        t = time.perf_counter()
        one_step(i)
        step_seconds.append(time.perf_counter() - t)
    if reducer is not None:
        reducer.wait_parameters()  # the last allgather belongs to the timed steps
    elapsed = time.perf_counter() - start
    elapsed = comm.allreduce(elapsed, op=MPI.MAX)
    status = proc_status()
    memory = model_state_bytes(model, optimizer, reducer, ddp)
    memory.update(vmhwm_before_model=hwm_before, vmhwm=status["VmHWM"],
                  vmhwm_delta=status["VmHWM"] - hwm_before, vmrss=status["VmRSS"])
    mine = {"rank": rank, "memory": memory,
            "step_span_median": statistics.median(step_spans) if step_spans else None,
            "step_spans": step_spans, "step_seconds": step_seconds}
    if trainer is not None:
        mine["compute_per_step"] = (trainer.timers["compute"] - compute0["compute"]) / args.steps
        mine["comm_wait_per_step"] = (trainer.timers["comm_wait"] - compute0["comm_wait"]) / args.steps
    sums = checksum(model)
    per_rank = comm.gather(mine, root=0)
    if timeline is not None:
        timeline.close()  # collective
    describe = reducer.describe() if reducer is not None else "torch DDP gloo"
    bucket_bytes = getattr(reducer, "bucket_bytes", None)
    if reducer is not None:
        reducer.close()
    else:
        import torch.distributed as dist
        dist.destroy_process_group()
    if rank == 0 and args.out:
        params = sum(q.numel() for q in model.parameters())
        with open(args.out, "w") as fh:
            json.dump({"variant": args.variant, "model": args.model, "parameters": params,
                       "size": size, "hosts": hosts, "batch_per_rank": args.batch,
                       "warmup": args.warmup, "steps": args.steps, "seconds": elapsed,
                       "samples_per_second": args.steps * args.batch * size / elapsed,
                       "parameter_checksum": sums, "reducer": describe,
                       "bucket_bytes": bucket_bytes, "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "per_rank": per_rank}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
