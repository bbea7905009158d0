"""Allreduce microbenchmark, OSU shape: warm-up, barrier, power-of-two sizes, rank 0 reports.

Compared side by side in one run: raw mpi4py Allreduce (in place and not), hpcaccel's
reducer (`allreduce_`, in place), Horovod's `allreduce_`, torch.distributed with gloo; and
this machine's memory-copy bandwidth as the physical limit. busbw = algbw * 2(n-1)/n, as
nccl-tests defines it.
"""
import os
import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.mpi(min_size=1)


def sizes(smoke):
    top = 16 if smoke else 26  # 4 B .. 64 KiB (smoke) or 64 MiB
    return [2 ** k for k in range(2, top + 1, 4 if smoke else 1)]


def iterations(nbytes, smoke):
    if smoke:
        return 3
    return 200 if nbytes <= 64 << 10 else 50 if nbytes <= 1 << 20 else 10 if nbytes <= 16 << 20 else 5


def time_op(comm, op, nbytes, smoke, repeats=3):
    """Best-of-repeats mean time per call; each repeat's time is the slowest rank's."""
    iters = iterations(nbytes, smoke)
    for _ in range(2):
        op()
    best = float("inf")
    for _ in range(1 if smoke else repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            op()
        dt = (time.perf_counter() - t0) / iters
        best = min(best, comm.allreduce(dt, op=__import__("mpi4py").MPI.MAX))
    return best


def implementations(comm):
    """name -> factory(buffer) -> timed callable, in the order they are measured.

    Order matters on a small machine: Horovod's background thread runs a coordination
    collective every cycle (1 ms) from hvd.init until the process exits, and on 2 cores it
    takes CPU from whatever runs next. So Horovod is started last, after everything else
    has been measured (it cannot be shut down and restarted within a process), and gloo's
    (idle) threads come just before it."""
    from mpi4py import MPI

    def raw_inplace(buf):
        return lambda: comm.Allreduce(MPI.IN_PLACE, buf.numpy())

    def raw_outofplace(buf):
        out = np.empty_like(buf.numpy())
        return lambda: comm.Allreduce(buf.numpy(), out)

    reducers = {}

    def reducer(backend):
        if backend not in reducers:
            from hpcaccel.comm import make_reducer
            reducers[backend] = make_reducer(backend, comm=comm)
        return reducers[backend]

    def hpcaccel_mpi(buf):
        red = reducer("mpi")
        return lambda: red.allreduce_(buf)

    def gloo(buf):
        import torch.distributed as dist
        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            port = comm.bcast(_free_port() if comm.Get_rank() == 0 else None)
            os.environ["MASTER_PORT"] = str(port)
            dist.init_process_group("gloo", rank=comm.Get_rank(), world_size=comm.Get_size())
        return lambda: dist.all_reduce(buf)

    def horovod(buf):
        red = reducer("horovod")
        return lambda: red.allreduce_(buf)

    from hpcaccel.comm import horovod_unavailable
    why_not = comm.allgather(horovod_unavailable())
    impls = {"mpi4py Allreduce in-place": raw_inplace, "mpi4py Allreduce": raw_outofplace,
             "hpcaccel mpi": hpcaccel_mpi, "torch.distributed gloo": gloo}
    missing = [w for w in why_not if w is not None]
    impls["hpcaccel horovod"] = horovod if not missing else f"unavailable: {missing[0]}"
    return impls


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memcpy_bandwidth(smoke) -> float:
    """Bytes moved per second by a large numpy copy (read + write), best of 5."""
    n = (8 if smoke else 256) << 20
    src, dst = np.ones(n // 4, np.float32), np.empty(n // 4, np.float32)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n / best


def test_allreduce_sweep(comm, smoke, record):
    size = comm.Get_size()
    impls = implementations(comm)
    results = {}
    for name, make in impls.items():
        if isinstance(make, str):
            results[name] = {"unavailable": make}
            continue
        rows = []
        for nbytes in sizes(smoke):
            buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
            t = time_op(comm, make(buf), nbytes, smoke)
            algbw = nbytes / t
            rows.append({"bytes": nbytes, "seconds": t, "algbw": algbw,
                         "busbw": algbw * 2 * (size - 1) / size if size > 1 else algbw})
        results[name] = {"rows": rows}
    record("allreduce", {"ranks": size, "memcpy_bytes_per_second": memcpy_bandwidth(smoke),
                         "results": results})
    if comm.Get_rank() == 0:
        print(f"\nallreduce at {size} ranks (latency us / busbw GB/s)")
        for name, r in results.items():
            if "rows" in r:
                pick = {row["bytes"]: row for row in r["rows"]}
                cells = [f"{b // 1024 if b >= 1024 else b}{'K' if b >= 1024 else 'B'}: "
                         f"{pick[b]['seconds'] * 1e6:.1f}us/{pick[b]['busbw'] / 1e9:.2f}"
                         for b in sorted(pick)[::4]]
                print(f"  {name:28s} " + "  ".join(cells))
            else:
                print(f"  {name:28s} {r['unavailable']}")
