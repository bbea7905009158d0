"""Resume at another world size: the plan (pure), the handover of a shuffled epoch, the
partial epoch sums, and the reader continuing an epoch of another layout."""
import numpy as np
import pytest

from hpcaccel.data import RankReader, open_dataset, write_file
from hpcaccel.data.sharding import handover_segments, rank_order, steps_per_epoch
from hpcaccel.elastic import lost_steps, redistribute_partial, resume_plan
from hpcaccel.errors import UsageError


# -- the plan ------------------------------------------------------------------------------
def test_shrinking_keeps_the_global_batch_with_more_accumulation():
    # 2 ranks x 16 -> 1 rank: 32 samples per rank in micro-batches of at most 16
    plan = resume_plan(32, from_world_size=2, world_size=1, batch_size=16, accum_steps=1,
                       epoch=1, step_in_epoch=7)
    assert (plan.batch_size, plan.accum_steps, plan.global_batch) == (32, 2, 32)
    assert plan.resized and plan.from_batch_size == 16
    assert plan.sample_in_epoch == 7 * 32
    line = plan.describe()
    assert "1 rank continues the checkpoint of 2 ranks" in line and "global batch 32" in line
    assert "--batch-size 32 with --accum-steps 2" in line and "at sample 224 (step 7)" in line


def test_growing_keeps_the_global_batch_with_less_per_rank():
    plan = resume_plan(32, from_world_size=1, world_size=2, batch_size=32, accum_steps=2)
    assert (plan.batch_size, plan.accum_steps) == (16, 1)
    plan = resume_plan(64, from_world_size=1, world_size=4, batch_size=64, accum_steps=16)
    assert (plan.batch_size, plan.accum_steps) == (16, 4)  # micro-batch 4 kept


@pytest.mark.parametrize("G,W,B,A", [(64, 1, 16, 4), (64, 2, 16, 4), (96, 3, 16, 3),
                                     (30, 5, 6, 4), (8, 8, 16, 1)])
def test_micro_batches_never_grow(G, W, B, A):
    plan = resume_plan(G, from_world_size=4, world_size=W, batch_size=B, accum_steps=A)
    assert plan.batch_size * W == G
    assert 1 <= plan.accum_steps <= plan.batch_size
    assert -(-plan.batch_size // plan.accum_steps) <= -(-B // A)  # largest micro-batch


def test_flags_that_already_give_the_global_batch_are_kept():
    plan = resume_plan(32, from_world_size=2, world_size=4, batch_size=8, accum_steps=2)
    assert (plan.batch_size, plan.accum_steps) == (8, 2)
    same = resume_plan(32, from_world_size=2, world_size=2, batch_size=16, accum_steps=1)
    assert not same.resized and (same.batch_size, same.accum_steps) == (16, 1)


def test_a_global_batch_the_ranks_cannot_split_is_one_line():
    with pytest.raises(UsageError) as e:
        resume_plan(48, from_world_size=3, world_size=5, batch_size=16, accum_steps=1)
    msg = str(e.value)
    assert "\n" not in msg
    assert "global batch 48 (3 x 16) cannot be kept on 5 ranks: 48 is not a multiple of 5" in msg
    assert "continue it on 1, 2, 3, 4, 6, 8, 12 or 16, ... ranks" in msg


# -- the partial epoch sums ----------------------------------------------------------------
def _epoch_means(partials, batch):
    """What Trainer.end_epoch computes from each rank's sums (taken = 1 step here)."""
    size = len(partials)
    loss = sum(p[0] for p in partials) / size
    stats = np.sum([np.asarray(p[1]) for p in partials], axis=0) / (batch * size)
    return loss, stats


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (4, 3), (2, 2)])
def test_redistributed_partial_sums_give_the_same_epoch_means(old, new):
    rng = np.random.default_rng(old * 10 + new)
    G = 12
    partials = [[float(rng.random()), list(rng.integers(0, G // old, 3).astype(float))]
                for _ in range(old)]
    moved = redistribute_partial(partials, new)
    assert len(moved) == new
    want, got = _epoch_means(partials, G // old), _epoch_means(moved, G // new)
    assert got[0] == pytest.approx(want[0]) and np.allclose(got[1], want[1])


def test_lost_steps_count_only_this_runs_progress_past_the_checkpoint():
    assert lost_steps({"run_id": "a", "step": 130}, 100, "a") == 30
    assert lost_steps({"run_id": "b", "step": 130}, 100, "a") == 0
    assert lost_steps({"run_id": "a", "step": 90}, 100, "a") == 0
    assert lost_steps(None, 100, "a") == 0


# -- the handover of a shuffled epoch ------------------------------------------------------
def _ids(segments):
    return [i for seg in segments for a, b in seg.ranges for i in range(a, b)]


@pytest.mark.parametrize("old,new,G", [(2, 1, 32), (1, 2, 32), (4, 2, 24), (2, 4, 24), (3, 2, 12)])
def test_handover_keeps_every_remaining_global_batch(old, new, G):
    lengths, chunk, seed, epoch, start = [700, 333, 91], 32, 3, 2, 5
    n = sum(lengths)
    steps = n // G
    old_orders = [rank_order(lengths, chunk, r, old, G // old, seed, epoch) for r in range(old)]
    b = G // old
    new_segs = [handover_segments(lengths, chunk, r, new, G // new, seed, epoch, start, old)
                for r in range(new)]
    assert all(len(s) == steps - start for s in new_segs)  # equal steps on every rank
    for k in range(start, steps):
        want = [int(i) for r in range(old) for i in old_orders[r][k * b:(k + 1) * b]]
        got = [i for r in range(new) for i in _ids([new_segs[r][k - start]])]
        assert got == want  # the same global batch, in the same order
    seen = [int(i) for r in range(old) for i in old_orders[r][:start * b]]
    rest = [i for r in range(new) for i in _ids(new_segs[r])]
    assert not set(seen) & set(rest) and len(set(seen + rest)) == len(seen + rest)
    assert len(seen) + len(rest) == steps * G  # nothing skipped, nothing twice


def test_rank_order_is_what_the_reader_yields(tmp_path):
    ds = _indexed(tmp_path / "d.h5", 500)
    reader = RankReader(ds, 1, 3, batch=8, shuffle=True, seed=7)
    read = [i for x, _ in reader.epoch(2) for i in x[:, 0].int().tolist()]
    assert read == rank_order(list(ds.lengths), ds.chunk, 1, 3, 8, 7, 2).tolist()


def _indexed(path, n, chunk=8):
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1)
    write_file(str(path), [x], [np.arange(n) % 5], n, (3,), 5, "test", chunk_rows=chunk)
    return open_dataset(str(path))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("old,new", [(2, 1), (1, 2)])
def test_reader_continues_another_layouts_epoch_at_the_exact_sample(tmp_path, shuffle, old, new):
    ds = _indexed(tmp_path / "d.h5", 403)
    G, epoch, start = 24, 1, 6
    before = [RankReader(ds, r, old, G // old, shuffle, seed=5) for r in range(old)]
    full = [[x[:, 0].int().tolist() for x, _ in rd.epoch(epoch)] for rd in before]
    after = [RankReader(ds, r, new, G // new, shuffle, seed=5) for r in range(new)]
    for rd in after:
        rd.continue_layout(epoch, old)
    rest = [[x[:, 0].int().tolist() for x, _ in rd.epoch(epoch, start)] for rd in after]
    steps = steps_per_epoch(403, G // new, new)
    for k in range(start, steps):  # step k's global batch is the uninterrupted run's
        want = [i for r in range(old) for i in full[r][k]]
        got = [i for r in range(new) for i in rest[r][k - start]]
        assert got == want
    # the next epoch is this world size's own layout again
    fresh = RankReader(ds, 0, new, G // new, shuffle, seed=5)
    assert ([x[:, 0].int().tolist() for x, _ in after[0].epoch(epoch + 1)]
            == [x[:, 0].int().tolist() for x, _ in fresh.epoch(epoch + 1)])
