"""The reader alone (no model): samples/s of every rank reading its share of one shuffled
epoch through RankReader, cold (the shards dropped from the page cache with posix_fadvise
DONTNEED after an fsync, checked with mincore) and warm, next to a plain sequential h5py
read of the same files on rank 0 (the limit on this disk); medians of REPEATS reads. Run at
1, 2 and 4 ranks; numbers are recorded, never asserted.

  for n in 1 2 4; do scripts/mpirun.sh $n python -m pytest benchmarks/test_data_reader.py --with-mpi -s; done
"""
import os
import time

import numpy as np
import pytest

pytestmark = pytest.mark.mpi(min_size=1)

SHARDS, FEATURES, BATCH = 8, 256, 256
REPEATS = 3  # each figure is the median of this many reads (an epoch here takes 0.1-1 s)


def quiet_barrier(comm):
    """Ranks that wait (while rank 0 reads alone, or for the slowest reader) must not take
    the CPU from the ones still reading: the control plane's barrier sleeps while it waits."""
    from hpcaccel.control import ControlPlane
    ControlPlane(comm).barrier()


def resident_bytes(paths) -> int:
    """Bytes of `paths` in this machine's page cache (mincore on a read-only mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    total = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {p}")
            try:
                vec = ctypes.create_string_buffer(pages)
                if libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore {p}")
                total += sum(b & 1 for b in vec.raw) * mmap.PAGESIZE
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return total


def drop_cache(paths) -> int:
    """Drop `paths` from the page cache; the bytes still resident afterwards (0 expected).
    Dirty pages (a file just written) are not dropped, hence the fsync first."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident_bytes(paths)


@pytest.fixture(scope="module")
def dataset(comm, smoke, tmp_path_factory):
    from hpcaccel.data import open_dataset, write_file, write_index

    per_shard = 1024 if smoke else 32768  # 8 x 32768 x 1 KiB = 256 MiB
    index = None
    if comm.Get_rank() == 0:
        d = tmp_path_factory.mktemp("reader-bench")
        rng = np.random.default_rng(0)
        files = []
        for s in range(SHARDS):
            x = rng.standard_normal((per_shard, FEATURES), dtype=np.float32)
            path = str(d / f"part-{s}.h5")
            write_file(path, [x], [rng.integers(0, 10, per_shard)], per_shard, (FEATURES,), 10, "bench")
            files.append(path)
        index = write_index(str(d), files, [per_shard] * SHARDS, (FEATURES,), 10, "bench")
    return open_dataset(comm.bcast(index))


def plain_sequential(ds):
    import h5py
    t0, n = time.perf_counter(), 0
    for p in ds.files:
        with h5py.File(p, "r") as f:
            x, y = f["x"], f["y"]
            for s in range(0, len(x), 4096):
                n += len(x[s:s + 4096])
                y[s:s + 4096]
    return n / (time.perf_counter() - t0)


def reader_epoch(comm, ds, epoch):
    from hpcaccel.data import RankReader
    reader = RankReader(ds, comm.Get_rank(), comm.Get_size(), BATCH, shuffle=True, seed=1)
    comm.Barrier()
    t0, n = time.perf_counter(), 0
    for x, _ in reader.epoch(epoch):
        n += len(x)
    elapsed = time.perf_counter() - t0
    quiet_barrier(comm)
    elapsed = comm.allreduce(elapsed, op=__import__("mpi4py").MPI.MAX)
    return comm.allreduce(n) / elapsed


def test_reader_against_sequential_read(comm, dataset, record):
    rank = comm.Get_rank()
    result = {}
    for state in ("cold", "warm"):
        plains, reads, left = [], [], []  # left: bytes still cached before each cold read
        for _ in range(REPEATS):
            if state == "cold":
                left.append(drop_cache(dataset.files) if rank == 0 else None)
            quiet_barrier(comm)
            plains.append(plain_sequential(dataset) if rank == 0 else None)
            quiet_barrier(comm)
            if state == "cold":
                left.append(drop_cache(dataset.files) if rank == 0 else None)
                quiet_barrier(comm)
            reads.append(reader_epoch(comm, dataset, 0))
        got, plain = float(np.median(reads)), comm.bcast(float(np.median(plains)) if rank == 0 else None)
        result[state] = {"reader_samples_per_s": got, "plain_samples_per_s": plain,
                         "ratio": got / plain, "reader_runs": reads,
                         "plain_runs": comm.bcast(plains), "resident_bytes_before": comm.bcast(left)}
    if rank == 0:
        for state, r in result.items():
            print(f"\nreader {comm.Get_size()} rank(s), {state}: {r['reader_samples_per_s']:,.0f} "
                  f"samples/s, plain sequential h5py {r['plain_samples_per_s']:,.0f} samples/s, "
                  f"ratio {r['ratio']:.2f}"
                  + (f"; bytes cached before the reads {r['resident_bytes_before']}"
                     if r["resident_bytes_before"] else ""), flush=True)
    record("data_reader", {"shards": SHARDS, "samples": dataset.samples, "features": FEATURES,
                           "batch": BATCH, **result})
