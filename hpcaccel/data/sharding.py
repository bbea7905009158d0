"""Which samples each rank reads, per epoch. Pure index math: no I/O, no MPI.

Samples of all files form one global index space [0, N), files in index order.
With G = batch * world and steps = N // G (the same on every rank, every epoch):

* shuffle off: global batch k is samples [k*G, (k+1)*G); rank r takes the r-th slice of B.
  A run's result therefore does not depend on the rank count, only on G.
* shuffle on (shard-affine): the space is cut into blocks (aligned with the HDF5 chunks);
  the files are permuted by (seed, epoch), and the blocks within each file too, and rank r
  takes positions [r*M, (r+1)*M) of that order, M = steps * B. Each rank reads only its
  own blocks, from about files/world files, as contiguous ranges, and shuffles samples
  within windows of a few batches. The global batches then depend on the world size.

The remainder (N - steps * G samples) is skipped each epoch: the last samples without
shuffling, a different random set with shuffling.

`files_read` and `eval_files` say which files a set of ranks (one host's) touches, for
staging only those (data.staging).

`handover_segments`: a run continued at another world size (elastic.py) with shuffle on
finishes the interrupted epoch in the checkpoint's layout: at every remaining step the
global batch is the one the checkpoint's ranks would have taken (their batches, in rank
order), and the new ranks split it. Without shuffling that is what `epoch_segments` gives
at any world size already.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Range = tuple[int, int]  # [start, stop) in the global index space


@dataclass(frozen=True)
class Segment:
    ranges: tuple[Range, ...]  # read and concatenated in this order
    shuffle_seed: tuple[int, ...] | None  # permute samples within the segment, or keep order

    @property
    def samples(self) -> int:
        return sum(b - a for a, b in self.ranges)


def steps_per_epoch(n_samples: int, batch: int, world: int) -> int:
    return n_samples // (batch * world)


def block_length(n_samples: int, chunk: int, world: int, min_blocks_per_rank: int = 16) -> int:
    """Shuffle granularity: the file's chunk length, smaller when the data is too small to
    give every rank several blocks (else one rank would own everything)."""
    return max(1, min(chunk, n_samples // max(1, world * min_blocks_per_rank)))


def blocks(lengths: list[int], block: int) -> list[Range]:
    """Cut each file's span into blocks; no block crosses a file boundary."""
    out, base = [], 0
    for n in lengths:
        out.extend((base + s, base + min(s + block, n)) for s in range(0, n, block))
        base += n
    return out


def shard_affine_order(lengths: list[int], block: int, seed: int, epoch: int) -> list[Range]:
    """All blocks, shards in a random order and each shard's blocks in a random order, both
    drawn from (seed, epoch): a contiguous run of positions lies in as few shards as possible,
    so a rank taking its contiguous share opens about shards/world files per epoch."""
    rng = np.random.default_rng([seed, epoch])
    per_file = [blocks([n], block) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    order = []
    for f in rng.permutation(len(lengths)):
        base, own = int(offsets[f]), per_file[f]
        order.extend((base + own[i][0], base + own[i][1]) for i in rng.permutation(len(own)))
    return order


def take(order: list[Range], start: int, stop: int) -> list[Range]:
    """Ranges covering positions [start, stop) of the concatenation of `order`."""
    out, pos = [], 0
    for a, b in order:
        n = b - a
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            out.append((a + lo - pos, a + hi - pos))
        pos += n
        if pos >= stop:
            break
    return _merge(out)


def _merge(ranges: list[Range]) -> list[Range]:
    merged = []
    for a, b in ranges:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def epoch_segments(lengths: list[int], chunk: int, rank: int, world: int, batch: int,
                   shuffle: bool, seed: int, epoch: int, window: int = 2048) -> list[Segment]:
    """The reads of `rank` in `epoch`, as segments whose concatenation is its sample order.

    Every segment holds a whole number of batches, so no batch spans two segments.
    """
    n = sum(lengths)
    steps = steps_per_epoch(n, batch, world)
    G = batch * world
    if not shuffle:
        return [Segment(tuple(take([(0, n)], k * G + rank * batch, k * G + (rank + 1) * batch)), None)
                for k in range(steps)]
    order = shard_affine_order(lengths, block_length(n, chunk, world), seed, epoch)
    per_rank = steps * batch
    win = batch * max(1, window // batch)
    segments = []
    for j, start in enumerate(range(rank * per_rank, (rank + 1) * per_rank, win)):
        stop = min(start + win, (rank + 1) * per_rank)
        segments.append(Segment(tuple(take(order, start, stop)), (seed, epoch, rank, j)))
    return segments


def rank_order(lengths: list[int], chunk: int, rank: int, world: int, batch: int, seed: int,
               epoch: int, window: int = 2048) -> np.ndarray:
    """Shuffle on: the sample indices `rank` reads in `epoch`, in the order its reader yields
    them (each segment's ranges concatenated, then permuted by the segment's seed)."""
    parts = []
    for seg in epoch_segments(lengths, chunk, rank, world, batch, True, seed, epoch, window):
        idx = np.concatenate([np.arange(a, b) for a, b in seg.ranges])
        if seg.shuffle_seed is not None:
            idx = idx[np.random.default_rng(list(seg.shuffle_seed)).permutation(len(idx))]
        parts.append(idx)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def handover_segments(lengths: list[int], chunk: int, rank: int, world: int, batch: int,
                      seed: int, epoch: int, start_step: int, from_world: int,
                      window: int = 2048) -> list[Segment]:
    """Shuffle on, continuing at `world` ranks a checkpoint of `from_world` ranks with the
    same global batch G = batch x world: this rank's reads for steps [start_step, steps) of
    `epoch`, one segment per step. Step k's global batch is the checkpoint layout's: old
    rank r's k-th batch at positions [r*b, (r+1)*b) (b = G / from_world); this rank takes
    positions [rank*batch, (rank+1)*batch). Samples come in the old order, as ranges of
    consecutive indices (mostly single samples: shuffled)."""
    n, G = sum(lengths), batch * world
    if G % from_world:
        raise ValueError(f"global batch {G} is not a multiple of {from_world} ranks")
    old_batch, steps = G // from_world, n // G
    lo, hi = rank * batch, (rank + 1) * batch
    olds = range(lo // old_batch, (hi - 1) // old_batch + 1)
    orders = {r: rank_order(lengths, chunk, r, from_world, old_batch, seed, epoch, window)
              for r in olds}
    segments = []
    for k in range(start_step, steps):
        idx = np.concatenate([orders[r][k * old_batch + max(lo - r * old_batch, 0):
                                        k * old_batch + min(hi - r * old_batch, old_batch)]
                              for r in olds])
        segments.append(Segment(tuple(_runs(idx)), None))
    return segments


def _runs(idx: np.ndarray) -> list[Range]:
    """Indices in order -> ranges of consecutive ones, [3, 4, 5, 9, 1] -> [(3, 6), (9, 10), (1, 2)]."""
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(idx)]])
    return [(int(idx[a]), int(idx[b - 1]) + 1) for a, b in zip(starts, stops)]


def eval_ranges(n_samples: int, rank: int, world: int) -> Range:
    """Evaluation covers every sample exactly once: rank r gets a contiguous near-equal part."""
    base, extra = divmod(n_samples, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def locate(ranges, lengths: list[int]) -> list[tuple[int, int, int]]:
    """Global ranges -> (file index, local start, local stop), split at file boundaries."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    out = []
    for a, b in ranges:
        while a < b:
            f = int(np.searchsorted(offsets, a, side="right") - 1)
            stop = min(b, int(offsets[f + 1]))
            out.append((f, a - int(offsets[f]), stop - int(offsets[f])))
            a = stop
    return out


def files_read(lengths: list[int], chunk: int, ranks, world: int, batch: int, shuffle: bool,
               seed: int, epochs) -> tuple[int, ...]:
    """Indices of the files that `ranks` read in training over `epochs` (an iterable of
    epoch numbers): the union of the files their `epoch_segments` lie in, sorted."""
    epochs, every = list(epochs), set(range(len(lengths)))
    if not shuffle:  # the same reads every epoch
        epochs = epochs[:1]
    found: set[int] = set()
    for epoch in epochs:
        for r in sorted(set(ranks)):
            for seg in epoch_segments(lengths, chunk, r, world, batch, shuffle, seed, epoch):
                found.update(f for f, a, b in locate(seg.ranges, lengths) if b > a)
        if found == every:
            break
    return tuple(sorted(found))


def eval_files(lengths: list[int], ranks, world: int) -> tuple[int, ...]:
    """Indices of the files that `ranks` read in evaluation (`eval_ranges`), sorted."""
    n = sum(lengths)
    return tuple(sorted({f for r in set(ranks)
                         for f, a, b in locate([eval_ranges(n, r, world)], lengths) if b > a}))
