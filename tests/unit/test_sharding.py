"""Which samples each rank reads: pure index math."""
import numpy as np
import pytest

from hpcaccel.data.sharding import (block_length, blocks, epoch_segments, eval_ranges, locate,
                                    steps_per_epoch, take)


def samples_of(segments):
    return [i for seg in segments for a, b in seg.ranges for i in range(a, b)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shuffle_off_global_batch_k_is_contiguous_and_rank_count_independent(world):
    lengths, G = [50, 37, 64], 24
    if G % world:
        pytest.skip("G not divisible")
    B = G // world
    steps = steps_per_epoch(sum(lengths), B, world)
    assert steps == sum(lengths) // G
    per_rank = [epoch_segments(lengths, 16, r, world, B, False, 0, 0) for r in range(world)]
    for k in range(steps):
        batch_k = [i for r in range(world) for a, b in per_rank[r][k].ranges for i in range(a, b)]
        assert batch_k == list(range(k * G, (k + 1) * G))
    assert all(seg.shuffle_seed is None for segs in per_rank for seg in segs)


@pytest.mark.parametrize("world,batch", [(1, 8), (2, 8), (3, 5), (4, 16), (7, 3)])
def test_shuffle_on_partitions_disjointly_with_equal_steps(world, batch):
    lengths = [1000, 333, 10]
    n = sum(lengths)
    for epoch in range(3):
        per_rank = [samples_of(epoch_segments(lengths, 64, r, world, batch, True, 5, epoch))
                    for r in range(world)]
        steps = steps_per_epoch(n, batch, world)
        assert all(len(s) == steps * batch for s in per_rank)  # same steps on every rank
        everything = [i for s in per_rank for i in s]
        assert len(set(everything)) == len(everything)  # no sample twice
        assert all(0 <= i < n for i in everything)


def test_shuffle_is_deterministic_per_seed_and_varies_per_epoch():
    args = ([4096], 128, 1, 4, 32, True)
    a = samples_of(epoch_segments(*args, seed=1, epoch=0))
    assert a == samples_of(epoch_segments(*args, seed=1, epoch=0))
    assert a != samples_of(epoch_segments(*args, seed=1, epoch=1))
    assert a != samples_of(epoch_segments(*args, seed=2, epoch=0))


def test_segments_hold_whole_batches():
    for seg in epoch_segments([10_000], 100, 1, 3, 48, True, 0, 0, window=500):
        assert seg.samples % 48 == 0


def test_blocks_do_not_cross_files_and_cover_everything():
    bl = blocks([10, 7], 4)
    assert bl == [(0, 4), (4, 8), (8, 10), (10, 14), (14, 17)]


def test_block_length_shrinks_for_small_data():
    assert block_length(1_000_000, 4096, 8) == 4096
    assert block_length(1437, 4096, 8) == 1437 // 128
    assert block_length(5, 4096, 8) == 1


def test_take_and_locate():
    order = [(10, 20), (0, 5), (30, 40)]
    assert take(order, 8, 17) == [(18, 20), (0, 5), (30, 32)]
    assert take([(0, 5), (5, 10)], 2, 8) == [(2, 8)]  # adjacent ranges merge
    assert locate([(8, 14)], [10, 10]) == [(0, 8, 10), (1, 0, 4)]


@pytest.mark.parametrize("n,world", [(10, 3), (3, 4), (360, 8)])
def test_eval_covers_every_sample_once(n, world):
    parts = [eval_ranges(n, r, world) for r in range(world)]
    assert [i for a, b in parts for i in range(a, b)] == list(range(n))
    sizes = [b - a for a, b in parts]
    assert max(sizes) - min(sizes) <= 1
