"""Node-local staging (--stage-dir): copy the data files once per host into node-local
storage before training, and read them from there.

Data read every epoch from a parallel filesystem costs metadata and network traffic each
epoch; a node-local copy (local SSD, /tmp, $SLURM_TMPDIR) costs one read. Over a run every
file is read on every host (the shuffled order changes per epoch), so the whole dataset is
staged. One rank per host (local rank 0) copies while the others wait; the outcome is agreed
collectively, so a full disk or an unwritable directory fails every rank with one line.

Cross-rank invariant: `stage` is collective (every rank calls it, in the same order).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile

from ..errors import UsageError
from .hdf5 import H5Dataset

HEADROOM = 0.95  # never fill node-local storage beyond this fraction of its free space


def source_tag(ds: H5Dataset) -> str:
    """A name for this version of the data: its paths, sizes and modification times (one
    stat per file; called on one rank), so a changed source is staged anew."""
    h = hashlib.sha256()
    for p in ds.files:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def staged_paths(ds: H5Dataset, stage_dir: str, tag: str) -> tuple[str, ...]:
    """Where each file of `ds` lives under `stage_dir`."""
    target = os.path.join(stage_dir, f"hpcaccel-{tag}")
    return tuple(os.path.join(target, f"{i:05d}-{os.path.basename(p)}") for i, p in enumerate(ds.files))


def copy_files(sources, targets, stage_dir: str, flag: str = "--stage-dir") -> int:
    """Copy each source to its target unless a copy of the same size is there; checked for
    free space first, each copy verified by size and published by rename. Bytes copied."""
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


def stage(ds: H5Dataset, stage_dir: str, control, local_rank: int, flag: str = "--stage-dir") -> H5Dataset:
    """Collective: `ds` with its files copied under `stage_dir` on every host, one copier per
    host (local rank 0); a failure on any host fails every rank (control.agree)."""
    tag = control.broadcast(control.collectively(lambda: source_tag(ds) if control.is_main else None))
    targets, error = None, None
    try:
        targets = staged_paths(ds, stage_dir, tag)
        if local_rank == 0:
            copy_files(ds.files, targets, stage_dir, flag)
    except Exception as e:  # noqa: BLE001 - reported on every rank by agree
        error = e
    control.agree(error)
    return dataclasses.replace(ds, files=targets)
