"""In-place MPI_Allreduce latency and busbw, for docs/multinode.md (not a test):

  scripts/hosts.sh run 1 .venv/bin/python tests/hosts/allreduce_probe.py   # across hosts
  scripts/mpirun.sh 2 .venv/bin/python tests/hosts/allreduce_probe.py      # shared memory

Per size: a warm-up call (the first one sets up connections), then the best of 5 timed
repeats, each the slowest rank's time. busbw = algbw * 2(n-1)/n (nccl-tests' definition).
Rank 0 prints one line per size.
"""
import time

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
n = comm.Get_size()
for nbytes in (8, 64 << 10, 1 << 20, 16 << 20, 64 << 20):
    buf = np.ones(nbytes // 4, dtype=np.float32)
    iters = 50 if nbytes <= 64 << 10 else 10 if nbytes <= 1 << 20 else 3
    comm.Allreduce(MPI.IN_PLACE, buf)
    best = float("inf")
    for _ in range(5):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            comm.Allreduce(MPI.IN_PLACE, buf)
        best = min(best, comm.allreduce((time.perf_counter() - t0) / iters, op=MPI.MAX))
    if comm.Get_rank() == 0:
        busbw = nbytes / best * 2 * (n - 1) / n * 8 / 1e9
        print(f"ranks {n} size {nbytes} B  time {best * 1e3:.3f} ms  busbw {busbw:.2f} Gbit/s", flush=True)
