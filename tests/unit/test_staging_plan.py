"""Which files a host stages (--stage-dir): the union, over the epochs still to train and the
host's ranks, of the files their reads lie in, plus the files of their evaluation parts.
Pure functions, checked against the reader's own segments."""
import itertools

import pytest

from hpcaccel.data.hdf5 import H5Dataset
from hpcaccel.data.sharding import epoch_segments, eval_files, eval_ranges, files_read, locate
from hpcaccel.data.staging import host_eval_files, host_files, host_ranks


def brute_force(lengths, chunk, ranks, world, batch, shuffle, seed, epochs):
    """The files the reader touches, from its segments, rank by rank and epoch by epoch."""
    found = set()
    for epoch, r in itertools.product(epochs, ranks):
        for seg in epoch_segments(lengths, chunk, r, world, batch, shuffle, seed, epoch):
            found.update(f for f, a, b in locate(seg.ranges, lengths) if b > a)
    return tuple(sorted(found))


@pytest.mark.parametrize("lengths,chunk,world,batch", [
    ([64] * 8, 8, 2, 4),
    ([64] * 8, 8, 4, 4),
    ([40, 7, 100, 64, 1, 33], 16, 3, 5),   # unequal files, one of a single sample
    ([32] * 64, 8, 16, 2),
    ([1000], 64, 4, 8),                    # one file
])
@pytest.mark.parametrize("shuffle", [True, False])
def test_files_read_is_the_union_of_the_readers_segments(lengths, chunk, world, batch, shuffle):
    for ranks in ([0], [world - 1], list(range(world)), list(range(0, world, 2))):
        for epochs in (range(0, 1), range(2, 5), range(3, 3)):
            assert files_read(lengths, chunk, ranks, world, batch, shuffle, 7, epochs) == \
                brute_force(lengths, chunk, ranks, world, batch, shuffle, 7, epochs), (ranks, epochs)


@pytest.mark.parametrize("shuffle", [True, False])
def test_files_read_are_the_files_the_reader_really_reads(tmp_path, shuffle):
    """Independent of the index arithmetic: real files whose samples carry their global
    index, read through RankReader by the host's ranks; the files their samples came from."""
    import numpy as np

    from hpcaccel.data import RankReader, open_dataset, write_file, write_index

    lengths, world, batch, host = [40, 7, 100, 64, 1, 33], 3, 5, [0, 2]
    offsets = np.cumsum([0] + lengths)
    files = []
    for f, n in enumerate(lengths):
        idx = np.arange(offsets[f], offsets[f + 1])
        files.append(str(tmp_path / f"part-{f}.h5"))
        write_file(files[-1], [idx[:, None].astype(np.float32)], [idx % 2], n, (1,), 2, "t",
                   chunk_rows=16)
    ds = open_dataset(write_index(str(tmp_path), files, lengths, (1,), 2, "t"))
    for epochs in (range(0, 1), range(1, 3)):
        seen = set()
        for epoch, r in itertools.product(epochs, host):
            reader = RankReader(ds, r, world, batch, shuffle=shuffle, seed=7)
            for x, _ in reader.epoch(epoch):
                seen.update(int(np.searchsorted(offsets, i, side="right")) - 1
                            for i in x.reshape(-1).tolist())
        assert files_read(lengths, ds.chunk, host, world, batch, shuffle, 7, epochs) == \
            tuple(sorted(seen)), epochs


def test_a_host_of_two_ranks_in_one_shuffled_epoch_needs_a_strict_subset():
    lengths, world = [256] * 8, 4  # 2 hosts x 2 ranks, 8 shards, one epoch
    hosts = [[0, 1], [2, 3]]
    need = [files_read(lengths, 64, h, world, 16, True, 0, range(1)) for h in hosts]
    assert all(0 < len(n) < 8 for n in need)  # about 8 x 2 / 4 = 4 each, never all 8
    assert set(need[0]) | set(need[1]) == set(range(8))  # together: every file some rank reads
    # later epochs draw other orders: over many epochs a host needs every file
    assert files_read(lengths, 64, hosts[0], world, 16, True, 0, range(20)) == tuple(range(8))
    # the same epochs give the same files (a pure function of the run)
    assert files_read(lengths, 64, hosts[0], world, 16, True, 0, range(1)) == need[0]


def test_without_shuffling_every_rank_runs_through_every_file():
    # global order: rank r's slice of each global batch, through all files in turn
    assert files_read([64] * 8, 8, [1], 2, 4, False, 0, range(1)) == tuple(range(8))
    # the last N mod G samples are never read: a file holding only those is not needed
    assert files_read([64, 64, 3], 8, [0, 1], 2, 4, False, 0, range(1)) == (0, 1)
    assert files_read([64] * 2, 8, [0], 2, 4, False, 0, range(0)) == ()  # no epochs left


def test_eval_files_follow_each_ranks_contiguous_part():
    lengths = [10, 10, 10, 10]
    assert eval_files(lengths, [0], 4) == (0,)
    assert eval_files(lengths, [1], 4) == (1,)
    assert eval_files(lengths, [1], 3) == (1, 2)  # samples [14, 27)
    assert eval_files(lengths, [0, 1, 2, 3], 4) == (0, 1, 2, 3)
    for world in (1, 2, 3, 5, 8, 50):
        for r in range(world):
            a, b = eval_ranges(40, r, world)
            touched = {f for f, lo, hi in locate([(a, b)], lengths) if hi > lo}
            assert eval_files(lengths, [r], world) == tuple(sorted(touched))
    assert eval_files([3], [5], 8) == ()  # more ranks than samples: some read nothing


def test_host_ranks_and_the_dataset_wrappers():
    assert host_ranks(["a", "b", "a", "b"], "a") == [0, 2]
    assert host_ranks(["a", "a"], "c") == []
    ds = H5Dataset(files=tuple(f"p{i}" for i in range(8)), lengths=(64,) * 8, sample_shape=(1,),
                   classes=2, chunk=8)
    assert host_files(ds, [0, 1], 4, 4, True, 3, range(1)) == \
        files_read([64] * 8, 8, [0, 1], 4, 4, True, 3, range(1))
    assert host_eval_files(ds, [3], 4) == (6, 7)
