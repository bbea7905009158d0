"""Node-local staging (--stage-dir): copy the data files this host's ranks will read once
into node-local storage before training, and read them from there.

Data read every epoch from a parallel filesystem costs metadata and network traffic each
epoch; a node-local copy (local SSD, /tmp, $SLURM_TMPDIR) costs one read. Which files a
host needs is a pure function of the run (sharding.files_read, sharding.eval_files): the
union, over the epochs still to train and over the host's ranks, of the files their reads
lie in, and the files of their evaluation parts. Only those are copied; every other file
keeps its path (read in place should it ever be needed). With shuffling each epoch draws a
new order, so over many epochs a host needs most files; over a few, about
files x ranks-per-host / ranks of them.

One rank per host (local rank 0) copies while the others wait; the outcome is agreed
collectively, so a full disk or an unwritable directory fails every rank with one line.
Before copying it removes the copies of earlier versions of the same files that no live
run reads (copies.py), so changing a shard does not leave a full copy behind each time.

Cross-rank invariant: `stage` and `stage_run` are collective (every rank calls them, in the
same order).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

from ..errors import UsageError
from . import copies
from .hdf5 import H5Dataset
from .sharding import eval_files, files_read

HEADROOM = 0.95  # never fill node-local storage beyond this fraction of its free space


def staged_paths(ds: H5Dataset, target: str) -> tuple[str, ...]:
    """Where each file of `ds` lives in its copy directory `target`."""
    return tuple(os.path.join(target, f"{i:05d}-{os.path.basename(p)}") for i, p in enumerate(ds.files))


def host_ranks(node_names, node_name: str) -> list[int]:
    """The ranks on host `node_name`, given every rank's host name in rank order. Pure."""
    return [r for r, name in enumerate(node_names) if name == node_name]


def host_files(ds: H5Dataset, ranks, world: int, batch: int, shuffle: bool, seed: int,
               epochs) -> tuple[int, ...]:
    """Indices of the files of training set `ds` that `ranks` read over `epochs`. Pure."""
    return files_read(list(ds.lengths), ds.chunk, ranks, world, batch, shuffle, seed, epochs)


def host_eval_files(ds: H5Dataset, ranks, world: int) -> tuple[int, ...]:
    """Indices of the files of evaluation set `ds` that `ranks` read. Pure."""
    return eval_files(list(ds.lengths), ranks, world)


def copy_files(sources, targets, stage_dir: str, flag: str = "--stage-dir") -> int:
    """Copy each source to its target unless a copy of the same size is there; checked for
    free space first, each copy verified by size and published by rename. Bytes copied."""
    if not sources:
        return 0
    try:
        os.makedirs(os.path.dirname(targets[0]), exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {stage_dir}: cannot create a directory there ({e.strerror})") from None
    todo = [(s, t, os.path.getsize(s)) for s, t in zip(sources, targets)
            if not (os.path.exists(t) and os.path.getsize(t) == os.path.getsize(s))]
    need = sum(n for _, _, n in todo)
    free = shutil.disk_usage(os.path.dirname(targets[0])).free
    if need > free * HEADROOM:
        raise UsageError(f"{flag} {stage_dir}: the data needs {need / 2**30:.2f} GiB, only "
                         f"{free / 2**30:.2f} GiB free there; choose node-local storage with room, "
                         f"or leave out {flag} to read in place")
    for src, dst, size in todo:
        fd, tmp = tempfile.mkstemp(prefix=".staging-", dir=os.path.dirname(dst))
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, 16 << 20)
            got = os.path.getsize(tmp)
            if got != size:
                raise OSError(f"{flag} {dst}: copied {got} of {size} bytes of {src}")
            os.replace(tmp, dst)  # another host sharing the directory may have won: same bytes
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return need


def stage(ds: H5Dataset, stage_dir: str, control, local_rank: int, flag: str = "--stage-dir",
          needed=None, stats: dict | None = None) -> H5Dataset:
    """Collective: `ds` with the files `needed` (indices; None: all) copied under `stage_dir`
    on every host, one copier per host (local rank 0), which first removes superseded
    copies of these files; the other files keep their paths. A failure on any host fails
    every rank (control.agree). `stats`, when given, receives this rank's files staged,
    bytes copied and superseded copies removed (0 on ranks that do not copy) and seconds."""
    t0 = time.perf_counter()
    # one stat per file, on one rank: the version of the data, and so the copy's name
    record = control.broadcast(control.collectively(
        lambda: copies.source_record(ds.files) if control.is_main else None))
    needed = list(range(len(ds.files))) if needed is None else sorted(set(needed))
    chosen = set(needed)
    files, copied, error = ds.files, 0, None
    superseded = {"removed": 0, "bytes": 0, "in_use": 0}
    try:
        target = copies.copy_dir(stage_dir, record)
        targets = staged_paths(ds, target)
        if local_rank == 0 and needed:
            _claim(target, record, stage_dir, flag)
            superseded = copies.remove_superseded(stage_dir, record)
            copied = copy_files([ds.files[i] for i in needed], [targets[i] for i in needed],
                                stage_dir, flag)
        files = tuple(targets[i] if i in chosen else p for i, p in enumerate(ds.files))
    except Exception as e:  # noqa: BLE001 - reported on every rank by agree
        error = e
    control.agree(error)
    if stats is not None:
        stats.update(files=len(needed), bytes_copied=copied, seconds=time.perf_counter() - t0,
                     superseded_removed=superseded["removed"],
                     superseded_bytes=superseded["bytes"], superseded_in_use=superseded["in_use"])
    return dataclasses.replace(ds, files=files)


def _claim(target: str, record, stage_dir: str, flag: str) -> None:
    """This run's hold on its copy (copies.hold), as one line naming the flag on failure."""
    try:
        copies.hold(target, record)
    except OSError as e:
        raise UsageError(f"{flag} {stage_dir}: cannot make or lock a copy there "
                         f"({e.strerror or e})") from None


def stage_run(cfg, control, world, train_ds: H5Dataset, test_ds: H5Dataset | None,
              start_epoch: int) -> tuple[H5Dataset, H5Dataset | None, dict]:
    """Collective: stage what this host's ranks read in this run: training files over epochs
    [start_epoch, cfg.epochs) and their evaluation parts of `test_ds`. Returns both datasets
    (staged files under cfg.stage_dir, the others in place) and a summary, maxima over hosts."""
    ranks = host_ranks(control.allgather(world.node_name), world.node_name)
    epochs = range(start_epoch, cfg.epochs)
    train_stats, test_stats = {}, {}
    train_ds = stage(train_ds, cfg.stage_dir, control, world.local_rank, needed=host_files(
        train_ds, ranks, world.size, cfg.batch_size, cfg.shuffle, cfg.seed, epochs),
        stats=train_stats)
    if test_ds is not None:
        test_ds = stage(test_ds, cfg.stage_dir, control, world.local_rank,
                        needed=host_eval_files(test_ds, ranks, world.size), stats=test_stats)
    def both(key):
        return train_stats[key] + test_stats.get(key, 0)

    most = control.allreduce([train_stats["files"], test_stats.get("files", 0),
                              both("bytes_copied"), both("seconds"), both("superseded_removed"),
                              both("superseded_bytes"), both("superseded_in_use")], "max")
    summary = {"train_files_per_host_max": int(most[0]), "test_files_per_host_max": int(most[1]),
               "bytes_copied_per_host_max": int(most[2]), "seconds_max": float(most[3]),
               "superseded_copies_removed_per_host_max": int(most[4]),
               "superseded_bytes_freed_per_host_max": int(most[5]),
               "superseded_copies_in_use_per_host_max": int(most[6])}
    return train_ds, test_ds, summary
