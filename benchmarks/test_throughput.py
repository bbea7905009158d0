"""Training throughput on the same models and the same synthetic HDF5 data through
hpcaccel (mpi), hpcaccel (horovod) and plain torch DDP (gloo), side by side in one run.

Models: a communication-heavy MLP (~25M parameters, 3072 -> 6144 -> 1024 -> 10) and a
compute-heavy small CNN (3x32x32). Weak scaling: 64 samples per rank per step; strong
scaling: 128 samples per step in total. Each configuration is repeated; the JSON holds
samples/s per repeat, mean and 95% interval, and hpcaccel's per-step breakdown (compute,
exposed communication, data wait). Efficiencies need the 1-rank run: `make bench` runs
1, 2 and 4 ranks and `python -m hpcaccel.bench report` combines them.
"""
import math
import os
import statistics
import time

import pytest
import torch

pytestmark = pytest.mark.mpi(min_size=1)

MODELS = {
    "mlp25m": {"shape": (3072,), "factory": lambda s, c: __import__("hpcaccel.models", fromlist=["mlp"]).mlp(s, c, hidden=(6144, 1024))},
    "cnn": {"shape": (3, 32, 32), "factory": lambda s, c: __import__("hpcaccel.models", fromlist=["cnn"]).cnn(s, c)},
}
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def plan(smoke):
    """(timed steps, warm-up steps, repeats) per configuration."""
    return (3, 1, 1) if smoke else (20, 3, 3)


def batches(size):
    """Per-rank batch: weak scaling keeps 64 per rank, strong scaling 128 in total."""
    return {"weak": 64, "strong": max(1, 128 // size)}


def summary(values):
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "values": values}
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": [mean - half, mean + half], "values": values}


@pytest.fixture(scope="module")
def datasets(comm, smoke, tmp_path_factory):
    """One synthetic HDF5 file per model, packed once by rank 0 (same data for every backend)."""
    from hpcaccel.data import open_dataset, write_blocks
    from hpcaccel.data.sources import synthetic_blocks

    out = {}
    base = tmp_path_factory.mktemp("bench-data") if comm.Get_rank() == 0 else None
    # enough for the longest run: warm-up + timed steps at the largest per-rank batch
    steps, warmup, _ = plan(smoke)
    n = max(batches(comm.Get_size()).values()) * comm.Get_size() * (warmup + steps + 1)
    for name, spec in MODELS.items():
        path = None
        if comm.Get_rank() == 0:
            path = str(base / f"{name}.h5")
            write_blocks(path, synthetic_blocks(n, spec["shape"], 10, 0, 0), n, spec["shape"], 10, "bench")
        out[name] = open_dataset(comm.bcast(path))
    return out


def run_hpcaccel(comm, backend, model_name, ds, batch, steps, warmup, info=None, **reducer_options):
    """(seconds, breakdown) of `steps` timed steps; `info` (a dict), if given, receives the
    reducer's start-up description and bucket size."""
    from hpcaccel.comm import make_reducer
    from hpcaccel.config import TrainConfig
    from hpcaccel.control import ControlPlane
    from hpcaccel.data import RankReader
    from hpcaccel.optim import make_optimizer
    from hpcaccel.trainer import Trainer

    rank, size = comm.Get_rank(), comm.Get_size()
    cfg = TrainConfig(batch_size=batch, lr=0.01, backend=backend, progress=False)
    torch.manual_seed(0)
    model = MODELS[model_name]["factory"](ds.sample_shape, ds.classes)
    opt = make_optimizer(cfg, model)
    reducer = make_reducer(backend, comm=comm, **reducer_options)
    reducer.broadcast_parameters(model)
    reducer.attach(model, opt)
    if info is not None:
        info.update(describe=reducer.describe(), bucket_bytes=getattr(reducer, "bucket_bytes", None))
    reader = RankReader(ds, rank, size, batch, shuffle=True, seed=0)
    trainer = Trainer(cfg, ControlPlane(comm), reducer, model, opt, reader)
    model.train()
    batches = iter(reader.epoch(0))
    for _ in range(warmup):
        trainer.train_step(*next(batches))
    trainer.timers = {k: 0.0 for k in trainer.timers}
    reader.wait_seconds = 0.0
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(*next(batches))
    comm.Barrier()
    seconds = time.perf_counter() - t0
    breakdown = {"compute": trainer.timers["compute"] / steps,
                 "comm_wait": trainer.timers["comm_wait"] / steps,
                 "data_wait": reader.wait_seconds / steps}
    batches.close()
    reducer.close()
    return seconds, {k: comm.allreduce(v, op=__import__("mpi4py").MPI.MAX) for k, v in breakdown.items()}


def run_ddp(comm, model_name, ds, batch, steps, warmup):
    import ddp_baseline as ddp

    rank, size = comm.Get_rank(), comm.Get_size()
    ddp.init_gloo(rank, size, comm.bcast(ddp.free_port() if rank == 0 else None))
    x, y = ddp.load_share(ds.files[0], rank, size, batch, warmup + steps)
    torch.manual_seed(0)
    model = MODELS[model_name]["factory"](ds.sample_shape, ds.classes)
    seconds, _ = ddp.train_ddp(model, x, y, batch, steps, warmup)
    return comm.allreduce(seconds, op=__import__("mpi4py").MPI.MAX), None


def backends(comm):
    """In the order they run. Horovod last: from hvd.init until the process exits its
    background thread runs a coordination collective every cycle (1 ms), which on a
    2-core machine takes CPU from anything measured after it (and it cannot be shut down
    and restarted within a process). gloo's threads are idle between calls."""
    from hpcaccel.comm import horovod_unavailable
    reasons = comm.allgather(horovod_unavailable())
    names = ["hpcaccel mpi", "torch DDP gloo"]
    if all(r is None for r in reasons):
        names.append("hpcaccel horovod")
    return names


@pytest.mark.parametrize("model_name", list(MODELS))
def test_throughput(comm, smoke, datasets, record, model_name):
    size = comm.Get_size()
    ds = datasets[model_name]
    steps, warmup, repeats = plan(smoke)
    results = {}
    for name in backends(comm):  # outer: no backend is measured after Horovod started
        for scaling, batch in batches(size).items():
            rates, breakdowns = [], []
            # interleave repeats is not possible across backends without re-initialising;
            # repeats of one backend run back to back, backends in a fixed order
            for _ in range(repeats):
                if name == "torch DDP gloo":
                    seconds, br = run_ddp(comm, model_name, ds, batch, steps, warmup)
                else:
                    seconds, br = run_hpcaccel(comm, name.split()[1], model_name, ds, batch, steps, warmup)
                rates.append(steps * batch * size / seconds)
                if br:
                    breakdowns.append(br)
            entry = {"samples_per_second": summary(rates), "batch_per_rank": batch}
            if breakdowns:
                entry["breakdown_seconds_per_step"] = {
                    k: statistics.fmean(b[k] for b in breakdowns) for k in breakdowns[0]}
            results.setdefault(scaling, {})[name] = entry
    params = sum(p.numel() for p in MODELS[model_name]["factory"](ds.sample_shape, ds.classes).parameters())
    record(f"throughput-{model_name}", {"ranks": size, "model": model_name, "parameters": params,
                                        "steps": steps, "repeats": repeats, "results": results})
    if comm.Get_rank() == 0:
        print(f"\n{model_name} ({params / 1e6:.1f}M parameters) at {size} ranks, samples/s:")
        for scaling, per in results.items():
            print(f"  {scaling}: " + ", ".join(f"{n} {e['samples_per_second']['mean']:.0f}" for n, e in per.items()))
