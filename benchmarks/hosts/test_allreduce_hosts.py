"""Allreduce across hosts: 64 KiB-64 MiB (HPCACCEL_BENCH_MAX_MB for more), side by side in
one run: raw mpi4py Allreduce in place, hpcaccel mpi with each --allreduce (sliced, ring,
hierarchical), torch.distributed gloo, and Horovod (HOROVOD_HIERARCHICAL_ALLREDUCE from the
environment, so `make bench-hosts` runs it flat and hierarchical in separate jobs). busbw
= algbw x 2(n-1)/n (nccl-tests), also as a fraction of the link rate when shaped.

Run across emulated hosts (`make bench-hosts`), e.g.
    scripts/hosts.sh up 2 --rate 1gbit
    HPCACCEL_BENCH_LINK_GBIT=1 scripts/hosts.sh run 1 bash scripts/pytest_rank.sh \
        benchmarks/hosts/test_allreduce_hosts.py -s
"""
import os
import time

import numpy as np
import pytest
import torch

from hostnet import init_gloo_across_hosts, layout, link_gbit

pytestmark = pytest.mark.mpi(min_size=2)


def sizes(smoke):
    if smoke:
        return [64 << 10]
    top = int(os.environ.get("HPCACCEL_BENCH_MAX_MB", "64"))
    return [64 << 10] + [m << 20 for m in (1, 4, 16, 64, 256) if m <= top]


def time_call(comm, op, nbytes, smoke):
    """Median of repeats (each the slowest rank's) after one warm-up call: shaped links are
    slow, so few calls; the median, not the best, as a training step sees it."""
    from mpi4py import MPI

    op()
    times = []
    for _ in range(1 if smoke else (5 if nbytes <= 16 << 20 else 3)):
        comm.Barrier()
        t0 = time.perf_counter()
        op()
        times.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return float(np.median(times)), min(times)


def implementations(comm, horovod):
    from mpi4py import MPI

    from hpcaccel.comm.mpi import MPIReducer

    def raw(buf):
        return lambda: comm.Allreduce(MPI.IN_PLACE, buf.numpy())

    impls = {"mpi4py Allreduce in-place": raw}
    for algo in ("sliced", "ring", "hierarchical"):
        reducer = MPIReducer(comm=comm, algorithm=algo)
        impls[f"hpcaccel mpi {algo}"] = (lambda r: lambda buf: lambda: r.allreduce_(buf))(reducer)

    def gloo(buf):
        import torch.distributed as dist
        if not dist.is_initialized():
            init_gloo_across_hosts(comm)
        return lambda: dist.all_reduce(buf)
    impls["torch.distributed gloo"] = gloo
    if horovod:
        def hvd_op(buf):
            import horovod.torch as hvd
            hvd.init(comm=comm)
            return lambda: hvd.allreduce_(buf, op=hvd.Sum, name="bench")
        flavour = "hierarchical" if os.environ.get("HOROVOD_HIERARCHICAL_ALLREDUCE") == "1" else "flat"
        impls[f"horovod {flavour}"] = hvd_op
    return impls


def test_allreduce_across_hosts(comm, smoke, record):
    from hpcaccel.comm import horovod_unavailable

    hosts, per_host = layout(comm)
    p = comm.Get_size()
    only_horovod = os.environ.get("HPCACCEL_BENCH_ONLY_HOROVOD") == "1"
    horovod = all(r is None for r in comm.allgather(horovod_unavailable()))
    impls = implementations(comm, horovod)
    if only_horovod:
        impls = {k: v for k, v in impls.items() if k.startswith("horovod")}
    else:
        impls = {k: v for k, v in impls.items() if not k.startswith("horovod")}
    rows = {}
    for name, factory in impls.items():
        for nbytes in sizes(smoke):
            buf = torch.ones(nbytes // 4)
            median, best = time_call(comm, factory(buf), nbytes, smoke)
            busbw = nbytes * 2 * (p - 1) / p / median * 8 / 1e9
            rows.setdefault(name, {})[nbytes] = {"seconds": median, "best_seconds": best,
                                                 "busbw_gbit": busbw}
            if comm.Get_rank() == 0:
                frac = f" = {busbw / link_gbit():.2f} x link" if link_gbit() else ""
                print(f"{name:28s} {nbytes >> 10:8d} KiB {median * 1e3:9.2f} ms  busbw {busbw:6.2f} Gbit/s{frac}", flush=True)
    tag = "horovod" if only_horovod else "all"
    flavour = "-hier" if os.environ.get("HOROVOD_HIERARCHICAL_ALLREDUCE") == "1" else ""
    record(f"hosts-allreduce-{hosts}x{per_host}-{tag}{flavour}",
           {"ranks": p, "hosts": hosts, "ranks_per_host": per_host, "link_gbit": link_gbit(),
            "results": rows})
