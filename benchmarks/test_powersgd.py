"""PowerSGD against the other wires, side by side in one run: bytes on the wire per step,
training throughput and final accuracy of hpcaccel (mpi backend) with fp32 and bf16 on the
wire and with --compression powersgd, and of torch DDP (gloo) with its own PowerSGD hook at
the same rank (one bucket, the plain hook: what works over gloo, see docs/backends.md).

  bash scripts/mpirun.sh 2 bash scripts/pytest_rank.sh benchmarks/test_powersgd.py -s
  bash scripts/mpirun.sh 1 bash scripts/pytest_rank.sh benchmarks/test_powersgd.py -s -k throughput
  # across 2 emulated hosts, 1 rank each, 1 Gbit/s links (root):
  scripts/hosts.sh up 2 --rate 1gbit
  scripts/hosts.sh run 1 env GLOO_SOCKET_IFNAME=eth0 HPCACCEL_BENCH_TAG=hosts2x1-1gbit \\
      bash scripts/pytest_rank.sh benchmarks/test_powersgd.py -s

Configurations alternate within each repeat (no Horovod here, so nothing lingers between
them). Records JSON (results/powersgd-*-np<N>.json); asserts nothing about speed.
"""
import os
import statistics
import subprocess
import time

import pytest
import torch

from hpcaccel.comm.powersgd import compressible

pytestmark = pytest.mark.mpi(min_size=1)

RANK = 4                  # PowerSGD rank, both implementations
START = 10                # exact steps first, both (torch's hook needs > 1 with error feedback)
CONFIGS = ("fp32 wire", "bf16 wire", f"powersgd r{RANK}", f"DDP PowerSGD hook r{RANK}")
COMPRESSION = {"fp32 wire": "none", "bf16 wire": "bf16", f"powersgd r{RANK}": "powersgd"}
TAG = os.environ.get("HPCACCEL_BENCH_TAG", "shm")


def mlp25m(shape, classes):
    from hpcaccel.models import mlp
    return mlp(shape, classes, hidden=(6144, 1024))


def plan(smoke):
    """(timed steps, warm-up steps past START, repeats, accuracy epochs)."""
    return (2, 1, 1, 1) if smoke else (15, 2, 3, 10)


def init_gloo(comm):
    """DDP's process group, once; across hosts (GLOO_SOCKET_IFNAME set) rank 0's address on
    that interface is the rendezvous."""
    import ddp_baseline as ddp

    addr = "127.0.0.1"
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    if ifname and comm.Get_rank() == 0:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", ifname], capture_output=True,
                             text=True).stdout.split()
        addr = out[out.index("inet") + 1].split("/")[0]
    os.environ["MASTER_ADDR"] = comm.bcast(addr)
    ddp.init_gloo(comm.Get_rank(), comm.Get_size(), comm.bcast(ddp.free_port() if comm.Get_rank() == 0 else None))


def wire_bytes(model, config) -> int:
    """Bytes each rank contributes to the allreduces of one compressed step."""
    total = 0
    for p in model.parameters():
        if config in ("powersgd", "ddp") and compressible(p.shape, RANK):
            total += (p.shape[0] + p[0].numel()) * RANK * 4
        else:
            total += p.numel() * (2 if config == "bf16" else 4)
    return total


def hpcaccel_parts(comm, config, model, batch, epochs=1, lr=0.01):
    """(cfg, reducer) of hpcaccel's mpi backend for `config`, attached to `model`."""
    from hpcaccel.comm import make_reducer
    from hpcaccel.config import TrainConfig
    from hpcaccel.optim import make_optimizer

    cfg = TrainConfig(batch_size=batch, lr=lr, backend="mpi", compression=COMPRESSION[config],
                      powersgd_rank=RANK, powersgd_start_step=START, progress=False,
                      epochs=epochs, out=os.devnull)
    opt = make_optimizer(cfg, model)
    reducer = make_reducer("mpi", comm=comm, compression=cfg.compression, powersgd_rank=RANK,
                           powersgd_start_step=START)
    reducer.broadcast_parameters(model)
    reducer.attach(model, opt)
    return cfg, opt, reducer


def ddp_powersgd(model, lr=0.01):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as hook
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, bucket_cap_mb=1000, gradient_as_bucket_view=True)
    state = hook.PowerSGDState(process_group=None, matrix_approximation_rank=RANK,
                               start_powerSGD_iter=START)
    ddp.register_comm_hook(state, hook.powerSGD_hook)
    return ddp, torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)


def samples_per_second(comm, config, x, y, batch, steps, warmup):
    torch.manual_seed(0)
    model = mlp25m(tuple(x.shape[1:]), 10)
    if config.startswith("DDP"):
        net, opt = ddp_powersgd(model)

        def step(xb, yb):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()
        close = lambda: None  # noqa: E731
    else:
        from hpcaccel.control import ControlPlane
        from hpcaccel.trainer import Trainer

        class OneBatch:  # the Trainer wants a reader; the steps below pass batches directly
            steps = 1
        cfg, opt, reducer = hpcaccel_parts(comm, config, model, batch)
        trainer = Trainer(cfg, ControlPlane(comm), reducer, model, opt, OneBatch())
        step, close = trainer.train_step, reducer.close
    n = len(y)
    for i in range(START + warmup + steps):
        if i == START + warmup:
            comm.Barrier()
            t0 = time.perf_counter()
        s = (i * batch) % (n - batch + 1)
        step(x[s:s + batch], y[s:s + batch])
    comm.Barrier()
    seconds = time.perf_counter() - t0
    close()
    return steps * batch * comm.Get_size() / seconds, wire_bytes(model, {
        "none": "fp32", "bf16": "bf16", "powersgd": "powersgd"}.get(COMPRESSION.get(config), "ddp"))


def test_powersgd_throughput_and_bytes(comm, smoke, record):
    import ddp_baseline as ddp
    from hpcaccel.data import write_blocks
    from hpcaccel.data.sources import synthetic_blocks

    size, rank = comm.Get_size(), comm.Get_rank()
    steps, warmup, repeats, _ = plan(smoke)
    batch = 64
    init_gloo(comm)
    n = batch * size * 8
    path = f"/tmp/hpcaccel-bench-powersgd-{os.getpid()}.h5" if rank == 0 else None
    if rank == 0:
        write_blocks(path, synthetic_blocks(n, (3072,), 10, 0, 0), n, (3072,), 10, "bench")
    path = comm.bcast(path)
    x, y = ddp.load_share(path, rank, size, batch, 8)
    comm.Barrier()
    if rank == 0:
        os.unlink(path)
    # one rank: the reference of the scaling efficiency (nothing travels, every wire is alike)
    configs = CONFIGS if size > 1 else CONFIGS[:1]
    rates = {c: [] for c in configs}
    wire = {}
    for _ in range(repeats):
        for config in configs:
            rate, wire[config] = samples_per_second(comm, config, x, y, batch, steps, warmup)
            rates[config].append(rate)
    results = {c: {"samples_per_second": {"mean": statistics.fmean(v), "values": v},
                   "wire_bytes_per_step": wire[c]} for c, v in rates.items()}
    record(f"powersgd-throughput-{TAG}", {"ranks": size, "model": "mlp25m", "batch_per_rank": batch,
                                          "rank": RANK, "steps": steps, "repeats": repeats,
                                          "results": results})
    if rank == 0:
        print(f"\nmlp25m, {size} ranks ({TAG}), batch {batch}/rank, PowerSGD rank {RANK}:")
        for c, e in results.items():
            v = e["samples_per_second"]["values"]
            print(f"  {c:24s} {e['wire_bytes_per_step'] / 1e6:8.2f} MB/step  "
                  f"{statistics.fmean(v):6.0f} samples/s  ({', '.join(f'{r:.0f}' for r in v)})")


def ddp_fit(comm, model, train, test, batch, epochs, lr):
    """torch DDP with the PowerSGD hook: this rank's share of each epoch's shuffled order."""
    net, opt = ddp_powersgd(model, lr)
    x, y = train
    rank, size = comm.Get_rank(), comm.Get_size()
    steps = len(y) // (batch * size)
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        net.train()
        for s in range(steps):
            idx = order[(s * size + rank) * batch:(s * size + rank + 1) * batch]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return (model(test[0]).argmax(1) == test[1]).float().mean().item()


def test_powersgd_final_accuracy(comm, smoke, record):
    """Digits (default CNN) and the synthetic task (MLP), same epochs, batch and lr."""
    from hpcaccel.control import ControlPlane
    from hpcaccel.data import RankReader, eval_batches, resolve
    from hpcaccel.models import build_model
    from hpcaccel.trainer import Trainer

    size, rank = comm.Get_size(), comm.Get_rank()
    if size == 1:
        pytest.skip("compression needs at least 2 ranks")
    epochs = plan(smoke)[3]
    init_gloo(comm)
    control = ControlPlane(comm)
    tasks = {"digits cnn": ("digits", "cnn", (1, 28, 28)), "synthetic mlp": ("synthetic", "mlp", (64,))}
    results = {}
    for task, (data, model_name, shape) in tasks.items():
        train_ds, test_ds = resolve(data, None, samples=8192, shape=shape, classes=10, seed=0,
                                    pack=rank == 0, wait=control.agree)
        for config in CONFIGS:
            torch.manual_seed(0)
            model = build_model(model_name, train_ds.sample_shape, train_ds.classes)
            if config.startswith("DDP"):
                tr = [torch.cat(t) for t in zip(*eval_batches(train_ds, 0, 1, 4096))]
                te = [torch.cat(t) for t in zip(*eval_batches(test_ds, 0, 1, 4096))]
                acc = ddp_fit(comm, model, tr, te, 16, epochs, 0.05)
            else:
                cfg, opt, reducer = hpcaccel_parts(comm, config, model, 16, epochs, lr=0.05)
                reader = RankReader(train_ds, rank, size, 16, True, 0)
                trainer = Trainer(cfg, control, reducer, model, opt, reader, test_ds)
                trainer.checkpoint = lambda *a, **k: None  # accuracy only, nothing written
                acc = trainer.fit()["test_accuracy"]
                reducer.close()
            results.setdefault(task, {})[config] = acc
    record(f"powersgd-accuracy-{TAG}", {"ranks": size, "epochs": epochs, "batch_per_rank": 16,
                                        "lr": 0.05, "rank": RANK, "start_step": START,
                                        "results": results})
    if rank == 0:
        print(f"\ntest accuracy after {epochs} epochs at {size} ranks:")
        for task, per in results.items():
            print(f"  {task}: " + ", ".join(f"{c} {a:.4f}" for c, a in per.items()))
