"""Per-rank reading: each rank opens the files itself (read-only) and reads only its ranges.

A background thread reads and batches the next segment while the current batch computes;
`wait_seconds` accumulates how long the training loop waited for data.
"""
from __future__ import annotations

import queue
import threading
import time

import h5py
import numpy as np
import torch

from ..timeline import NullTimeline
from .hdf5 import H5Dataset
from .sharding import Segment, epoch_segments, eval_ranges, locate, steps_per_epoch

_DONE = object()


class _Files:
    """Open handles of one dataset's files, owned by one thread."""

    def __init__(self, ds: H5Dataset):
        self.ds = ds
        self.handles = [h5py.File(p, "r") for p in ds.files]

    def read(self, ranges) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f, a, b in locate(ranges, list(self.ds.lengths)):
            xs.append(self.handles[f]["x"][a:b])
            ys.append(self.handles[f]["y"][a:b])
        x = np.concatenate(xs) if len(xs) > 1 else xs[0]
        y = np.concatenate(ys) if len(ys) > 1 else ys[0]
        return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)

    def close(self):
        for h in self.handles:
            h.close()


class RankReader:
    """Training batches of one rank: `steps` batches of `batch` samples per epoch."""

    def __init__(self, ds: H5Dataset, rank: int, world: int, batch: int, shuffle: bool,
                 seed: int, prefetch: int = 4, timeline=None):
        self.ds, self.rank, self.world, self.batch = ds, rank, world, batch
        self.shuffle, self.seed, self.prefetch = shuffle, seed, prefetch
        self.steps = steps_per_epoch(ds.samples, batch, world)
        self.wait_seconds = 0.0
        # a Timeline (--timeline) records each wait as a span
        self.timeline = timeline if timeline is not None else NullTimeline()

    def segments(self, epoch: int) -> list[Segment]:
        return epoch_segments(list(self.ds.lengths), self.ds.chunk, self.rank, self.world,
                              self.batch, self.shuffle, self.seed, epoch)

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
                if item is _DONE:
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
            files = _Files(self.ds)
            skip = start_step * self.batch
            for seg in self.segments(epoch):
                if skip >= seg.samples:
                    skip -= seg.samples
                    continue
                x, y = files.read(seg.ranges)
                if seg.shuffle_seed is not None:
                    perm = np.random.default_rng(list(seg.shuffle_seed)).permutation(len(x))
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


def eval_batches(ds: H5Dataset, rank: int, world: int, batch: int):
    """This rank's contiguous part of an evaluation set, every sample exactly once overall."""
    a, b = eval_ranges(ds.samples, rank, world)
    files = _Files(ds)
    try:
        for s in range(a, b, batch):
            x, y = files.read([(s, min(s + batch, b))])
            yield torch.from_numpy(x), torch.from_numpy(y)
    finally:
        files.close()
