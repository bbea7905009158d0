"""Per-rank reading: each rank opens the files itself (read-only) and reads only its ranges.

A file is opened when the rank first reads from it, and at most `max_open` stay open
(files.Handles), so a rank that reads a few shards of many opens only those few.

A background thread reads and batches the next segment while the current batch computes;
`wait_seconds` accumulates how long the training loop waited for data.
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np
import torch

from ..timeline import NullTimeline
from .files import COUNTERS, DEFAULT_MAX_OPEN, Handles
from .hdf5 import H5Dataset
from .sharding import Segment, epoch_segments, eval_ranges, handover_segments, steps_per_epoch

_DONE = object()


class RankReader:
    """Training batches of one rank: `steps` batches of `batch` samples per epoch."""

    def __init__(self, ds: H5Dataset, rank: int, world: int, batch: int, shuffle: bool,
                 seed: int, prefetch: int = 4, timeline=None, max_open: int = DEFAULT_MAX_OPEN):
        self.ds, self.rank, self.world, self.batch = ds, rank, world, batch
        self.max_open = max_open
        self.shuffle, self.seed, self.prefetch = shuffle, seed, prefetch
        self.steps = steps_per_epoch(ds.samples, batch, world)
        self.wait_seconds = 0.0
        # (epoch, ranks) of a checkpoint written at another world size (elastic.py): with
        # shuffle on, that epoch's rest is read in the checkpoint's layout
        self.handover: tuple[int, int] | None = None
        # a Timeline (--timeline) records each wait as a span
        self.timeline = timeline if timeline is not None else NullTimeline()

    def segments(self, epoch: int) -> list[Segment]:
        return epoch_segments(list(self.ds.lengths), self.ds.chunk, self.rank, self.world,
                              self.batch, self.shuffle, self.seed, epoch)

    def continue_layout(self, epoch: int, from_world: int) -> None:
        """Continue `epoch` of a checkpoint written by `from_world` ranks (same global
        batch): no sample of it skipped or taken twice (sharding.handover_segments)."""
        self.handover = (epoch, from_world)

    def remaining(self, epoch: int, start_step: int) -> tuple[list[Segment], int]:
        """(segments, samples of the first to skip) for steps [start_step, steps) of `epoch`."""
        if (self.shuffle and self.handover is not None and self.handover[0] == epoch
                and self.handover[1] != self.world):
            return handover_segments(list(self.ds.lengths), self.ds.chunk, self.rank, self.world,
                                     self.batch, self.seed, epoch, start_step,
                                     self.handover[1]), 0
        skip = start_step * self.batch
        segments = self.segments(epoch)
        while segments and skip >= segments[0].samples:  # steps done before a resume
            skip -= segments[0].samples
            segments = segments[1:]
        return segments, skip

    def epoch(self, epoch: int, start_step: int = 0):
        """Yield (x, y) tensors for steps [start_step, steps) of `epoch`."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(epoch, start_step, q, stop),
                                  name=f"hpcaccel-reader-{self.rank}", daemon=True)
        worker.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                t1 = time.perf_counter()
                self.wait_seconds += t1 - t0
                self.timeline.add("data_wait", t0, t1)
                if item is _DONE:  # this rank's totals so far, one sample per epoch
                    self.timeline.count("data_io", **COUNTERS.snapshot())
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(0.01)

    def _produce(self, epoch, start_step, q, stop):
        files = None
        try:
            files = Handles(self.ds.files, self.ds.lengths, self.max_open)
            segments, skip = self.remaining(epoch, start_step)
            for ranges, shuffle_seed in read_groups(segments):
                x, y = files.read(ranges)
                if shuffle_seed is not None:
                    perm = np.random.default_rng(list(shuffle_seed)).permutation(len(x))
                    x, y = x[perm], y[perm]
                for s in range(skip, len(x), self.batch):
                    if stop.is_set():
                        return
                    q.put((torch.from_numpy(x[s:s + self.batch]), torch.from_numpy(y[s:s + self.batch])))
                skip = 0
            q.put(_DONE)
        except BaseException as e:  # surfaced in the consuming thread
            q.put(e)
        finally:
            if files is not None:
                files.close()


def read_groups(segments, window: int = 2048):
    """(ranges, shuffle_seed) per read: shuffled segments one by one (each is permuted as a
    whole); consecutive unshuffled ones (one batch each) together, up to `window` samples,
    adjacent ranges merged, so a rank reading in global order makes few large reads. The
    samples and their order are those of the segments."""
    group, size = [], 0
    for seg in segments:
        if seg.shuffle_seed is not None:
            if group:
                yield _merged(group), None
                group, size = [], 0
            yield list(seg.ranges), seg.shuffle_seed
            continue
        group.extend(seg.ranges)
        size += seg.samples
        if size >= window:
            yield _merged(group), None
            group, size = [], 0
    if group:
        yield _merged(group), None


def _merged(ranges):
    out = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def eval_batches(ds: H5Dataset, rank: int, world: int, batch: int,
                 max_open: int = DEFAULT_MAX_OPEN):
    """This rank's contiguous part of an evaluation set, every sample exactly once overall;
    only the files that part lies in are opened."""
    a, b = eval_ranges(ds.samples, rank, world)
    files = Handles(ds.files, ds.lengths, max_open, "--test-data")
    try:
        for s in range(a, b, batch):
            x, y = files.read([(s, min(s + batch, b))])
            yield torch.from_numpy(x), torch.from_numpy(y)
    finally:
        files.close()


def first_batch(ds: H5Dataset, n: int, flag: str = "--data") -> tuple[torch.Tensor, torch.Tensor]:
    """The dataset's first n samples (fewer if it holds fewer) as (x, y) tensors: what a
    check before training runs on; opens the first file only."""
    files = Handles(ds.files, ds.lengths, 1, flag)
    try:
        x, y = files.read([(0, min(n, ds.samples))])
    finally:
        files.close()
    return torch.from_numpy(x), torch.from_numpy(y)
