"""HDF5 dataset files: the on-disk format, writing it, opening and validating it.

Format: datasets `x` (N, *sample_shape), float, and `y`, chunked along the first axis;
attributes `classes`, `sample_shape`, `source`. y is one of (`Target`):
  class labels        (N,) integers in [0, classes)
  labels per element  (N, *shape) integers in [0, classes), e.g. a class per pixel
  float targets       (N, *shape) floats of any shape (regression; `classes` is 0)
A sharded dataset is N such files plus `index.json` (format "hpcaccel-shards", version 1)
listing them in order.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import h5py
import numpy as np

from ..errors import UsageError
from ..fsutil import atomic_path, atomic_write
from .files import COUNTERS, damaged, open_h5

INDEX_FORMAT = "hpcaccel-shards"
_FLOAT_KINDS = ("f",)
_INT_KINDS = ("i", "u")


@dataclass(frozen=True)
class Target:
    """What y holds per sample: its shape (() for one class label), dtype as read (int64 for
    integer labels, float32 for float targets) and the class count (0 for float targets)."""
    shape: tuple[int, ...] = ()
    dtype: str = "int64"
    classes: int = 0

    @property
    def integer(self) -> bool:
        return self.dtype == "int64"

    @property
    def kind(self) -> str:
        """"class labels", "labels per element" or "float targets"."""
        if not self.integer:
            return "float targets"
        return "labels per element" if self.shape else "class labels"

    def describe(self) -> str:
        """One phrase for info lines and errors, e.g. `float targets of shape (3,)`."""
        if self.kind == "class labels":
            return f"class labels, {self.classes} classes"
        what = f"{self.kind} of shape {self.shape}"
        return what + (f", {self.classes} classes" if self.integer else "")


def target_of(dtype, shape, classes: int) -> Target:
    """The Target of a y dataset or array: integer y holds labels, float y float targets."""
    integer = np.dtype(dtype).kind in _INT_KINDS
    return Target(tuple(int(s) for s in shape), "int64" if integer else "float32",
                  int(classes) if integer else 0)


@dataclass(frozen=True)
class H5Dataset:
    """Metadata of a (possibly sharded) dataset; the files themselves are opened per reader."""
    files: tuple[str, ...]
    lengths: tuple[int, ...]
    sample_shape: tuple[int, ...]
    classes: int
    chunk: int  # samples per HDF5 chunk (of the first file)
    head: str = ""  # digest of the first file's first samples: the data's identity (runrecord)
    target_shape: tuple[int, ...] = ()  # y per sample: () for class labels
    target_dtype: str = "int64"  # int64 (labels) or float32 (float targets), as read

    @property
    def samples(self) -> int:
        return sum(self.lengths)

    @property
    def target(self) -> Target:
        return Target(self.target_shape, self.target_dtype, self.classes)


def default_chunk_rows(sample_bytes: int, target_bytes: int = 1 << 20) -> int:
    """About 1 MiB per chunk: large enough for fast sequential reads, small enough to
    shuffle at a fine grain."""
    return max(1, target_bytes // max(1, sample_bytes))


def write_blocks(path: str, blocks, n: int, sample_shape, classes: int, source: str,
                 chunk_rows: int | None = None, compression: str | None = None,
                 target: Target | None = None) -> None:
    """Write one file of n samples from an iterable of (x, y) blocks, atomically.

    `target`: what y holds (default: class labels); float targets are stored as float32,
    labels as int64. One block is in memory at a time, so a generator of blocks writes data
    of any size. Readers never see a partial file, an existing file is replaced only once
    the new one is complete, and the file's permissions follow the umask (fsutil.atomic_path).
    """
    sample_shape = tuple(int(s) for s in sample_shape)
    target = target or Target(classes=classes)
    y_shape, y_dtype = target.shape, np.dtype(target.dtype)
    row_bytes = 4 * int(np.prod(sample_shape)) + y_dtype.itemsize * int(np.prod(y_shape))
    chunk = min(n, chunk_rows or default_chunk_rows(row_bytes))
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            x = f.create_dataset("x", (n, *sample_shape), dtype="float32",
                                 chunks=(max(1, chunk), *sample_shape), compression=compression)
            y = f.create_dataset("y", (n, *y_shape), dtype=y_dtype,
                                 chunks=(max(1, chunk), *y_shape), compression=compression)
            pos = 0
            for xb, yb in blocks:
                k = len(xb)
                if pos + k > n:
                    raise ValueError(f"{path}: more than the expected {n} samples")
                x[pos:pos + k] = np.asarray(xb, dtype=np.float32).reshape(k, *sample_shape)
                y[pos:pos + k] = np.asarray(yb, dtype=y_dtype).reshape(k, *y_shape)
                pos += k
            if pos != n:
                raise ValueError(f"{path}: expected {n} samples, got {pos}")
            f.attrs["classes"] = int(classes) if target.integer else 0
            f.attrs["sample_shape"] = np.asarray(sample_shape, dtype=np.int64)
            f.attrs["source"] = source


def write_file(path: str, x_parts, y_parts, n: int, sample_shape, classes: int, source: str,
               chunk_rows: int | None = None, compression: str | None = None,
               target: Target | None = None) -> None:
    """write_blocks from parallel sequences of x and y blocks (arrays already in memory);
    `target` defaults to what the first y block holds."""
    y_parts = list(y_parts)
    if target is None and y_parts:
        first = np.asarray(y_parts[0])
        target = target_of(first.dtype, first.shape[1:], classes)
    write_blocks(path, zip(x_parts, y_parts), n, sample_shape, classes, source,
                 chunk_rows=chunk_rows, compression=compression, target=target)


def write_index(directory: str, files: list[str], lengths: list[int], sample_shape, classes: int,
                source: str, target: Target | None = None) -> str:
    target = target or Target(classes=classes)
    index = {"format": INDEX_FORMAT, "version": 1, "source": source,
             "classes": int(classes) if target.integer else 0,
             "target_shape": list(target.shape), "target_dtype": target.dtype,
             "sample_shape": list(sample_shape), "samples": int(sum(lengths)),
             "files": [{"path": os.path.basename(p), "samples": int(n)} for p, n in zip(files, lengths)]}
    path = os.path.join(directory, "index.json")
    data = json.dumps(index, indent=1).encode()
    atomic_write(path, lambda fh: fh.write(data))
    return path


def open_dataset(path: str, flag: str = "--data") -> H5Dataset:
    """Open an HDF5 file or a shard index and check its structure. Raises UsageError with
    one line naming the file; reads metadata only."""
    if path.endswith(".json"):
        return _open_index(path, flag)
    meta = _inspect(path, flag, head=True)
    return H5Dataset((path,), (meta["n"],), meta["shape"], meta["classes"], meta["chunk"],
                     meta["head"], meta["target"].shape, meta["target"].dtype)


def _open_index(path: str, flag: str) -> H5Dataset:
    try:
        with open(path) as fh:
            index = json.load(fh)
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {path}: not a readable shard index ({e})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not index.get("files"):
        raise UsageError(f"{flag} {path}: not an hpcaccel shard index (format {INDEX_FORMAT!r})")
    base = os.path.dirname(os.path.abspath(path))
    files, lengths, metas = [], [], []
    for entry in index["files"]:
        fpath = os.path.join(base, entry["path"])
        meta = _inspect(fpath, flag, head=not metas)
        if meta["n"] != entry["samples"]:
            raise UsageError(f"{flag} {fpath}: has {meta['n']} samples but {path} lists "
                             f"{entry['samples']}")
        files.append(fpath)
        lengths.append(meta["n"])
        metas.append(meta)
    for meta, fpath in zip(metas, files):
        if meta["shape"] != metas[0]["shape"] or meta["classes"] != metas[0]["classes"]:
            raise UsageError(f"{flag} {fpath}: sample shape {meta['shape']} / {meta['classes']} "
                             f"classes differ from {files[0]} ({metas[0]['shape']} / "
                             f"{metas[0]['classes']})")
        if meta["target"] != metas[0]["target"]:
            raise UsageError(f"{flag} {fpath}: y holds {meta['target'].describe()}, "
                             f"{files[0]} {metas[0]['target'].describe()}")
    first = metas[0]
    return H5Dataset(tuple(files), tuple(lengths), first["shape"], first["classes"],
                     first["chunk"], first["head"], first["target"].shape, first["target"].dtype)


def _inspect(path: str, flag: str, head: bool = False) -> dict:
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory, not a file (give an HDF5 file or "
                         f"the index.json of a sharded dataset)")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {path}: not readable (permission denied)")
    if not h5py.is_hdf5(path):
        raise UsageError(f"{flag} {path}: not an HDF5 file")
    try:
        return _inspect_open(path, flag, head)
    except OSError as e:  # recognised as HDF5, but cut short or corrupt
        raise damaged(flag, path, e) from None


def _inspect_open(path: str, flag: str, head: bool = False) -> dict:
    with open_h5(path, flag) as f:
        for name in ("x", "y"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise UsageError(f"{flag} {path}: has no dataset {name!r} (expected x and y)")
        x, y = f["x"], f["y"]
        if y.ndim < 1:
            raise UsageError(f"{flag} {path}: y must be (samples, ...), has shape {y.shape}")
        if x.ndim < 2:
            raise UsageError(f"{flag} {path}: x must be (samples, ...), has shape {x.shape}")
        if len(x) != len(y):
            raise UsageError(f"{flag} {path}: x has {len(x)} samples but y has {len(y)}")
        if len(x) == 0:
            raise UsageError(f"{flag} {path}: the dataset is empty")
        if x.dtype.kind not in _FLOAT_KINDS + _INT_KINDS:
            raise UsageError(f"{flag} {path}: x must be numeric, has dtype {x.dtype}")
        if y.dtype.kind not in _FLOAT_KINDS + _INT_KINDS:
            raise UsageError(f"{flag} {path}: y must hold integer labels or float targets, "
                             f"has dtype {y.dtype}")
        classes = 0
        if y.dtype.kind in _INT_KINDS:
            classes = int(f.attrs["classes"]) if "classes" in f.attrs else None
            if classes is None:  # not packed by hpcaccel: infer from the labels
                classes = int(np.max(y[...])) + 1
        digest = ""
        if head:  # read while the file is open anyway: identifying the data costs no open
            digest = hashlib.sha256(x[:8].tobytes() + y[:8].tobytes()).hexdigest()[:16]
        return {"n": len(x), "shape": tuple(int(s) for s in x.shape[1:]), "classes": classes,
                "chunk": int(x.chunks[0]) if x.chunks else min(len(x), 4096), "head": digest,
                "target": target_of(y.dtype, y.shape[1:], classes)}


def _read_block(h, path: str, flag: str, a: int, b: int):
    try:
        y, x = h["y"][a:b], h["x"][a:b]
    except OSError as e:  # opened, but the data is cut short or corrupt
        raise damaged(flag, path, e) from None
    COUNTERS.read(x.nbytes + y.nbytes)
    return y, x


def scan(ds: H5Dataset, rank: int = 0, world: int = 1, flag: str = "--data",
         block_bytes: int = 16 << 20) -> dict:
    """Check this rank's share of the samples for what the target needs: labels (one per
    sample or per element) in [0, classes), float targets finite; x finite.

    Ranks scan disjoint parts in parallel, so the whole dataset is checked once, in
    bounded memory, before training starts. Returns what start-up warnings need about the
    share: min_label (integer targets; None for an empty share), y_count, y_sum and
    y_sumsq (float targets, over every element), and from its first block x_integer (an
    integer dtype), x_whole (float values all whole numbers), x_min, x_max.
    """
    from .sharding import eval_ranges, locate

    a, b = eval_ranges(ds.samples, rank, world)
    target = ds.target
    sample_bytes = 4 * int(np.prod(ds.sample_shape)) + 8 * int(np.prod(target.shape))
    rows = max(1, block_bytes // sample_bytes)
    handles = {}
    stats = {"min_label": None} if target.integer else {"y_count": 0, "y_sum": 0.0, "y_sumsq": 0.0}
    try:
        for f, lo, hi in locate([(a, b)], list(ds.lengths)):
            path = ds.files[f]
            if f not in handles:
                handles[f] = open_h5(path, flag)
            h = handles[f]
            for s in range(lo, hi, rows):
                y, x = _read_block(h, path, flag, s, min(s + rows, hi))
                _check_targets(y, target, path, flag, s, stats)
                if x.dtype.kind == "f" and not np.isfinite(x).all():
                    i = int(np.argmax(~np.isfinite(x.reshape(len(x), -1)).all(axis=1)))
                    raise UsageError(f"{flag} {path}: sample {s + i} contains NaN or inf")
                if "x_min" not in stats and x.size:
                    stats.update(x_integer=x.dtype.kind in _INT_KINDS,
                                 x_whole=bool(np.all(x == np.round(x))),
                                 x_min=float(x.min()), x_max=float(x.max()))
    finally:
        for h in handles.values():
            h.close()
    return stats


def _check_targets(y, target: Target, path: str, flag: str, first: int, stats: dict) -> None:
    """One block of y (samples `first`...): labels in range, float targets finite; adds the
    block to `stats`."""
    per_sample = y.reshape(len(y), -1)
    if target.integer:
        bad = (per_sample < 0) | (per_sample >= target.classes)
        if bad.any():
            i = int(np.argmax(bad.any(axis=1)))
            label = int(per_sample[i][bad[i]][0])
            where = "" if not target.shape else " (an element)"
            raise UsageError(f"{flag} {path}: label {label} of sample {first + i}{where} out of "
                             f"range [0, {target.classes})")
        if y.size:
            low = int(y.min())
            if stats["min_label"] is None or low < stats["min_label"]:
                stats["min_label"] = low
        return
    finite = np.isfinite(per_sample).all(axis=1)
    if not finite.all():
        i = int(np.argmax(~finite))
        raise UsageError(f"{flag} {path}: the target of sample {first + i} contains NaN or inf")
    values = per_sample.astype(np.float64)
    stats["y_count"] += values.size
    stats["y_sum"] += float(values.sum())
    stats["y_sumsq"] += float(np.square(values).sum())
