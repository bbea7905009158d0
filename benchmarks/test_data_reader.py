"""The reader alone (no model): samples/s of every rank reading its share of one shuffled
epoch through RankReader, cold (the shards dropped from the page cache with posix_fadvise
DONTNEED) and warm, next to a plain sequential h5py read of the same files on rank 0 (the
limit on this disk). Run at 1, 2 and 4 ranks; numbers are recorded, never asserted.

  for n in 1 2 4; do scripts/mpirun.sh $n python -m pytest benchmarks/test_data_reader.py --with-mpi -s; done
"""
import os
import time

import numpy as np
import pytest

pytestmark = pytest.mark.mpi(min_size=1)

SHARDS, FEATURES, BATCH = 8, 256, 256


def drop_cache(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a file just written) are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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
    elapsed = comm.allreduce(time.perf_counter() - t0, op=__import__("mpi4py").MPI.MAX)
    return comm.allreduce(n) / elapsed


def test_reader_against_sequential_read(comm, dataset, record):
    rank = comm.Get_rank()
    result = {}
    for state in ("cold", "warm"):
        if state == "cold":
            if rank == 0:
                drop_cache(dataset.files)
            comm.Barrier()
        plain = plain_sequential(dataset) if rank == 0 else None
        if state == "cold":
            if rank == 0:
                drop_cache(dataset.files)
            comm.Barrier()
        got = reader_epoch(comm, dataset, 0)
        plain = comm.bcast(plain)
        result[state] = {"reader_samples_per_s": got, "plain_samples_per_s": plain,
                         "ratio": got / plain}
    if rank == 0:
        for state, r in result.items():
            print(f"\nreader {comm.Get_size()} rank(s), {state}: {r['reader_samples_per_s']:,.0f} "
                  f"samples/s, plain sequential h5py {r['plain_samples_per_s']:,.0f} samples/s, "
                  f"ratio {r['ratio']:.2f}", flush=True)
    record("data_reader", {"shards": SHARDS, "samples": dataset.samples, "features": FEATURES,
                           "batch": BATCH, **result})
