"""Training throughput across hosts: the 25M-parameter MLP and the CNN, the same synthetic
data, through hpcaccel mpi (--allreduce sliced and auto), torch DDP (gloo) and, last,
hpcaccel horovod, with repeats interleaved (except Horovod, whose background thread would
slow whatever ran after it). Reports samples/s, hpcaccel's step breakdown, and the bound:
the gradient's link time (2(p-1)/p x bytes at the link rate of one host) or compute, the
longer.

    scripts/hosts.sh up 2 --rate 1gbit
    HPCACCEL_BENCH_LINK_GBIT=1 scripts/hosts.sh run 1 bash scripts/pytest_rank.sh \
        benchmarks/hosts/test_train_hosts.py -s
"""
import os
import statistics
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import test_throughput as tp  # noqa: E402  (the models, data and summary of the throughput benchmark)
from test_throughput import datasets  # noqa: E402,F401  (its fixture: one synthetic file per model)

from hostnet import init_gloo_across_hosts, layout, link_gbit  # noqa: E402

pytestmark = pytest.mark.mpi(min_size=2)
BATCH = 64  # per rank, as in the measurements
CONFIGS = ("hpcaccel mpi sliced", "hpcaccel mpi auto", "torch DDP gloo")


def plan(smoke):
    """(timed steps, warm-up steps, repeats)."""
    return (2, 1, 1) if smoke else (int(os.environ.get("HPCACCEL_BENCH_STEPS", "10")), 3, 3)


@pytest.mark.parametrize("model_name", list(tp.MODELS))
def test_train_across_hosts(comm, smoke, datasets, record, model_name):
    from mpi4py import MPI

    from hpcaccel.comm import horovod_unavailable

    size = comm.Get_size()
    hosts, per_host = layout(comm)
    ds = datasets[model_name]
    steps, warmup, repeats = plan(smoke)
    rates = {name: [] for name in CONFIGS}
    breakdowns = {name: [] for name in CONFIGS}
    for _ in range(repeats):
        for name in CONFIGS:
            if name == "torch DDP gloo":
                import torch.distributed as dist
                if not dist.is_initialized():
                    init_gloo_across_hosts(comm)
                seconds, br = tp.run_ddp(comm, model_name, ds, BATCH, steps, warmup)
            else:
                seconds, br = tp.run_hpcaccel(comm, "mpi", model_name, ds, BATCH, steps, warmup,
                                              allreduce=name.split()[-1])
            rates[name].append(steps * BATCH * size / seconds)
            if br:
                breakdowns[name].append(br)
    if os.environ.get("HPCACCEL_BENCH_HOROVOD", "1") == "1" and all(
            r is None for r in comm.allgather(horovod_unavailable())):
        name = "hpcaccel horovod"
        rates[name], breakdowns[name] = [], []
        for _ in range(repeats):
            seconds, br = tp.run_hpcaccel(comm, "horovod", model_name, ds, BATCH, steps, warmup)
            rates[name].append(steps * BATCH * size / seconds)
            breakdowns[name].append(br)
    model = tp.MODELS[model_name]["factory"](ds.sample_shape, ds.classes)
    grad_bytes = sum(p.numel() for p in model.parameters()) * 4
    compute = statistics.fmean(b["compute"] for b in breakdowns["hpcaccel mpi sliced"])
    bound = None
    if link_gbit():
        # each host's link carries 2(p-1)/p of the gradient per rank of it, or (node-aware)
        # 2(H-1)/H of it in total; the better of the two is the bound
        per_host_bytes = min(per_host * 2 * (size - 1) / size, 2 * (hosts - 1) / hosts) * grad_bytes
        link_seconds = per_host_bytes * 8 / (link_gbit() * 1e9)
        bound = BATCH * size / max(link_seconds, compute)
    results = {n: {"samples_per_second": tp.summary(r),
                   "breakdown_seconds_per_step": ({k: statistics.fmean(b[k] for b in breakdowns[n])
                                                   for k in breakdowns[n][0]} if breakdowns[n] else None)}
               for n, r in rates.items()}
    record(f"hosts-train-{model_name}-{hosts}x{per_host}",
           {"ranks": size, "hosts": hosts, "ranks_per_host": per_host, "link_gbit": link_gbit(), "model": model_name,
            "gradient_bytes": grad_bytes, "batch_per_rank": BATCH, "steps": steps,
            "repeats": repeats, "bound_samples_per_second": bound, "results": results})
    if comm.Get_rank() == 0:
        print(f"\n{model_name} at {hosts} hosts x {per_host}, link {link_gbit()} Gbit/s, "
              f"bound {bound and round(bound)} samples/s:")
        for n, e in results.items():
            s = e["samples_per_second"]
            br = e["breakdown_seconds_per_step"]
            extra = f"  compute {br['compute'] * 1e3:.0f} ms, comm wait {br['comm_wait'] * 1e3:.0f} ms" if br else ""
            print(f"  {n:22s} {s['mean']:7.1f} samples/s {[round(v) for v in s['values']]}{extra}", flush=True)
    comm.Barrier()
