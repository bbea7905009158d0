"""The data layer at scale, counted in one process on real HDF5 files: damaged files are bad
input, readers open only the shards they read (a bounded number at a time), each rank reads
its share, and the shuffled order spans few shards per rank. World sizes are simulated by
building every rank's reader here; tests/integration/test_data_at_scale.py runs it for real."""
import math
import os

import numpy as np
import pytest

from hpcaccel.data import COUNTERS, RankReader, eval_batches, open_dataset, scan, write_file, write_index
from hpcaccel.data.files import Handles
from hpcaccel.data.sharding import epoch_segments, locate, steps_per_epoch
from hpcaccel.errors import UsageError

SHARDS, PER_SHARD, SHAPE, CLASSES = 64, 32, (4,), 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 shards of 32 samples; x[i, 0] is the sample's global index (to check what was read)."""
    d = tmp_path_factory.mktemp("shards")
    files = []
    for s in range(SHARDS):
        idx = np.arange(s * PER_SHARD, (s + 1) * PER_SHARD)
        x = np.repeat(idx[:, None], SHAPE[0], axis=1).astype(np.float32)
        path = str(d / f"shard-{s:03d}.h5")
        write_file(path, [x], [idx % CLASSES], PER_SHARD, SHAPE, CLASSES, "test", chunk_rows=8)
        files.append(path)
    return write_index(str(d), files, [PER_SHARD] * SHARDS, SHAPE, CLASSES, "test")


def opens(fn):
    before = COUNTERS.snapshot()
    result = fn()
    after = COUNTERS.snapshot()
    return after["files_opened"] - before["files_opened"], after["bytes_read"] - before["bytes_read"], result


def truncate(src: str, dst: str, fraction: float) -> str:
    with open(src, "rb") as fh:
        data = fh.read()
    with open(dst, "wb") as fh:
        fh.write(data[:int(len(data) * fraction)])
    return dst


# -- damaged files: one line naming the file (exit 2 through UsageError) ---------------------
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95])
def test_truncated_hdf5_file_is_bad_input_naming_the_file(shards, tmp_path, fraction):
    src = os.path.join(os.path.dirname(shards), "shard-000.h5")
    bad = truncate(src, str(tmp_path / "cut.h5"), fraction)
    with pytest.raises(UsageError) as e:
        open_dataset(bad, "--data")
    msg = str(e.value)
    assert msg.startswith(f"--data {bad}: damaged HDF5 file") and "\n" not in msg, msg


def test_truncated_shard_of_an_index_is_named(shards, tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    src_dir = os.path.dirname(shards)
    names = [f"shard-{s:03d}.h5" for s in range(3)]
    for i, n in enumerate(names):
        truncate(os.path.join(src_dir, n), str(d / n), 0.6 if i == 1 else 1.0)
    index = write_index(str(d), [str(d / n) for n in names], [PER_SHARD] * 3, SHAPE, CLASSES, "t")
    with pytest.raises(UsageError, match=f"--test-data {d / names[1]}: damaged HDF5 file"):
        open_dataset(index, "--test-data")


# -- opening only what is read -----------------------------------------------------------------
def test_metadata_opens_each_shard_once(shards):
    n, _, ds = opens(lambda: open_dataset(shards))
    assert (n, len(ds.files), ds.samples) == (SHARDS, SHARDS, SHARDS * PER_SHARD)


def test_handles_open_lazily_and_stay_bounded(shards):
    ds = open_dataset(shards)
    h = Handles(ds.files, ds.lengths, max_open=3)
    n, nbytes, _ = opens(lambda: [h.read([(f * PER_SHARD, f * PER_SHARD + 4)]) for f in (0, 1, 0, 1)])
    assert n == 2 and len(h._open) == 2  # re-reading an open shard does not reopen it
    n, _, _ = opens(lambda: [h.read([(f * PER_SHARD, f * PER_SHARD + 1)]) for f in range(2, 10)])
    assert n == 8 and len(h._open) == 3  # least recently used closed, never more than 3 open
    h.close()
    assert not h._open
    assert nbytes == 4 * 4 * (4 * SHAPE[0] + 8)  # 4 reads of 4 samples: float32 x, int64 y


@pytest.mark.parametrize("world", [16, 5])
@pytest.mark.parametrize("shuffle", [False, True])
def test_per_epoch_each_rank_opens_few_shards_and_reads_its_share(shards, world, shuffle):
    ds = open_dataset(shards)
    batch = 4
    steps = steps_per_epoch(ds.samples, batch, world)
    limit = math.ceil(SHARDS / world) + 2
    seen = []
    for rank in range(world):
        reader = RankReader(ds, rank, world, batch, shuffle=shuffle, seed=7, prefetch=2)
        for epoch in (0, 1):
            n, nbytes, xs = opens(lambda: [x for x, _ in reader.epoch(epoch)])
            share = steps * batch
            got = np.concatenate([x[:, 0].numpy() for x in xs]).astype(int)
            assert len(got) == share
            if shuffle:
                # shard-affine order: a contiguous share of the permuted shards
                assert n <= limit, (rank, epoch, n, limit)
            else:
                # global order (rank-count independent): each shard the rank reads, once
                touched = {f for f, _, _ in locate([(int(i), int(i) + 1) for i in got], list(ds.lengths))}
                assert n == len(touched), (rank, epoch, n, len(touched))
            # bytes read: its share, +- one block (ranges never re-read)
            sample_bytes = 4 * SHAPE[0] + 8
            assert abs(nbytes - share * sample_bytes) <= 8 * sample_bytes
            if epoch == 0:
                seen.append(got)
    every = np.concatenate(seen)
    assert len(set(every.tolist())) == len(every) == world * steps * batch  # disjoint shares


def test_shuffled_order_is_a_function_of_seed_epoch_data_and_world():
    lengths = [37, 64, 5, 100, 80] * 6

    def order(world, seed, epoch):
        return [epoch_segments(lengths, 16, r, world, 4, True, seed, epoch) for r in range(world)]
    assert order(4, 1, 0) == order(4, 1, 0)
    assert order(4, 1, 0) != order(4, 1, 1) and order(4, 1, 0) != order(4, 2, 0)
    for world in (1, 3, 8, 16):
        # a rank's share is contiguous in the shard order: whole shards plus two partial ones
        share = steps_per_epoch(sum(lengths), 4, world) * 4
        limit = share // min(lengths) + 2
        for segs in order(world, 5, 3):
            ranges = [r for seg in segs for r in seg.ranges]
            assert len({f for f, _, _ in locate(ranges, lengths)}) <= limit


def test_evaluation_opens_only_its_part(shards):
    ds = open_dataset(shards)
    world = 16
    total = 0
    for rank in range(world):
        n, _, batches = opens(lambda: list(eval_batches(ds, rank, world, 8)))
        assert n <= math.ceil(SHARDS / world) + 1
        total += sum(len(y) for _, y in batches)
    assert total == ds.samples


def test_scan_opens_only_its_share_of_shards(shards):
    ds = open_dataset(shards)
    world = 16
    per_rank = [opens(lambda: scan(ds, r, world))[0] for r in range(world)]
    assert max(per_rank) <= math.ceil(SHARDS / world) + 1
    assert sum(per_rank) <= SHARDS + world  # each shard O(1) times in total


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_follow_the_segments_and_resume_mid_epoch_exactly(shards, shuffle):
    ds = open_dataset(shards)
    world, batch = 3, 5
    for rank in range(world):
        reader = RankReader(ds, rank, world, batch, shuffle=shuffle, seed=2, prefetch=2)
        full = [x[:, 0].numpy().astype(int).tolist() for x, _ in reader.epoch(1)]
        assert len(full) == reader.steps and all(len(b) == batch for b in full)
        want = [i for seg in reader.segments(1) for a, b in seg.ranges for i in range(a, b)]
        got = [i for b in full for i in b]
        assert (got == want) if not shuffle else (sorted(got) == sorted(want))
        for k in (1, reader.steps // 2, reader.steps - 1):
            rest = [x[:, 0].numpy().astype(int).tolist() for x, _ in reader.epoch(1, start_step=k)]
            assert rest == full[k:]
