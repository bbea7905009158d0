"""Pack arrays into hpcaccel's HDF5 format, or describe a packed dataset.

  python -m hpcaccel.data pack --source digits --split train --out digits-train.h5
  python -m hpcaccel.data pack --source synthetic --samples 100000 --shape 3,32,32 \\
      --classes 10 --shards 8 --out /scratch/synth          # 8 files + index.json
  python -m hpcaccel.data pack --source arrays.npz --out data.h5   # keys x and y
  python -m hpcaccel.data pack --source fields.npz --out fields.h5  # float y of any shape
  python -m hpcaccel.data pack --source diabetes --split test --out diabetes-test.h5
  python -m hpcaccel.data pack --source x.npy --labels y.npy --out data.h5
  python -m hpcaccel.data pack --source images.npz --normalize --out data.h5  # uint8 -> [0, 1]
  python -m hpcaccel.data pack --source arrays.npz --label-offset 1 --out data.h5  # 1..K -> 0..K-1
  python -m hpcaccel.data info data.h5

y may hold one integer class label per sample, integer labels per element (a class per
pixel), or float targets of any shape (regression; stored as float32); --y-dtype float32
packs integer y as float targets. An existing output is replaced only with --overwrite.
Integer samples (8-bit images, say) are packed as float32 unchanged unless --normalize
scales them into [0, 1].
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ..cli import Parser, usage_error
from ..errors import UsageError
from .hdf5 import Target, open_dataset, target_of, write_blocks, write_index
from .sources import diabetes_split, digits_split, synthetic_blocks

BLOCK_ROWS = 4096  # samples converted to float32 at a time


def _load_arrays(args):
    src = args.source
    if src in ("digits", "diabetes"):
        train, test = digits_split() if src == "digits" else diabetes_split()
        return train if args.split == "train" else test
    if not os.path.exists(src):
        raise UsageError(f"--source {src}: no such file (or built-in source: digits, "
                         f"diabetes, synthetic)")
    try:
        if src.endswith(".npz"):
            with np.load(src) as z:
                for key in (args.x_key, args.y_key):
                    if key not in z:
                        raise UsageError(f"--source {src}: has no array {key!r} (has {', '.join(z.files)})")
                return z[args.x_key], z[args.y_key]
        if args.labels is None:
            raise UsageError("--labels: required with a .npy --source (the labels array)")
        return np.load(src), np.load(args.labels)
    except (OSError, ValueError) as e:
        raise UsageError(f"--source {src}: cannot read ({e})") from None


def _check_arrays(x, y, source, y_dtype: str = "auto"):
    """x as (N, ...) and y as packed: integer y (labels, one per sample or per element)
    unchanged, float y (or any y with --y-dtype float32) as float32 targets."""
    if y.ndim < 1 or len(x) != len(y):
        raise UsageError(f"--source {source}: x has {len(x)} samples but y has "
                         f"{len(y) if y.ndim else 'none (a scalar)'}")
    if len(x) == 0:
        raise UsageError(f"--source {source}: no samples")
    if x.ndim < 2:
        x = x.reshape(len(x), 1)
    integer = np.issubdtype(y.dtype, np.integer)
    if not (integer or np.issubdtype(y.dtype, np.floating)):
        raise UsageError(f"--source {source}: y must hold integer labels or float targets, "
                         f"got {y.dtype} {y.shape}")
    if y_dtype == "float32" or not integer:
        y = y.astype(np.float32)
        if not np.all(np.isfinite(y)):
            i = int(np.argmax(~np.isfinite(y.reshape(len(y), -1)).all(axis=1)))
            raise UsageError(f"--source {source}: the target of sample {i} is NaN or inf")
    elif y.min() < 0:
        raise UsageError(f"--source {source}: negative label {int(y.min())}")
    if not np.all(np.isfinite(x)):
        raise UsageError(f"--source {source}: x contains NaN or inf")
    return x, y


def warn(message: str) -> None:
    print(f"hpcaccel.data: warning: {message}", file=sys.stderr)


def x_scale(x, source: str, normalize: bool) -> float:
    """The factor x is multiplied by. Integer samples train badly as they are (0-255 pixels
    give losses around 1e10), so say so, or with --normalize scale them into [0, 1]: x in
    [0, 255] by 1/255 (8-bit images, whatever the array's integer type), other unsigned x
    by 1/(the type's maximum)."""
    integer = np.issubdtype(x.dtype, np.integer)
    if not normalize:
        if integer:
            warn(f"--source {source}: x is {x.dtype} (values {int(x.min())} to {int(x.max())}), "
                 f"packed as float32 unchanged; unscaled inputs train badly (huge losses): "
                 f"pack with --normalize to scale them into [0, 1]")
        return 1.0
    if not integer:
        raise UsageError(f"--normalize: x of --source {source} is {x.dtype}, not integer; "
                         f"scale it before packing")
    low, high = int(x.min()), int(x.max())
    if 0 <= low and high <= 255:
        return 1 / 255
    if np.issubdtype(x.dtype, np.unsignedinteger):
        return 1 / float(np.iinfo(x.dtype).max)
    raise UsageError(f"--normalize: x of --source {source} is {x.dtype} with values {low} to "
                     f"{high}; only integers in [0, 255] or unsigned types are normalised")


def shift_labels(y, offset: int, source: str):
    """y less --label-offset (labels numbered from 1, say, packed from 0)."""
    if offset < 0:
        raise UsageError(f"--label-offset {offset}: must be 0 or more (it is subtracted from "
                         f"every label)")
    if not offset:
        return y
    low = int(y.min())
    if low - offset < 0:
        raise UsageError(f"--label-offset {offset}: label {low} of --source {source} would "
                         f"become {low - offset}; the offset is at most the smallest label")
    return y.astype(np.int64) - offset


def check_labels(y, classes_given, source: str) -> None:
    low, high = int(y.min()), int(y.max())
    if classes_given is None and low >= 1:
        warn(f"--source {source}: labels run from {low} to {high}, packed as {high + 1} classes "
             f"with class{'es 0 to ' + str(low - 1) if low > 1 else ' 0'} empty; add "
             f"--label-offset {low} to start them at 0 (or give --classes to keep them as they are)")


def output_paths(out: str, shards: int, overwrite: bool) -> tuple[list[str], list[str]]:
    """(the files pack writes, stale shard files of an earlier pack that --overwrite removes).
    Refuses to touch an existing output without --overwrite."""
    if shards == 1:
        if os.path.isdir(out):
            raise UsageError(f"--out {out}: is a directory (with one shard, --out is the .h5 file)")
        if os.path.exists(out) and not overwrite:
            raise UsageError(f"--out {out}: already exists; choose another --out, or add "
                             f"--overwrite to replace it")
        return [out], []
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: is a file (with --shards, --out is a directory)")
    paths = [os.path.join(out, f"part-{i:05d}.h5") for i in range(shards)]
    existing = sorted(n for n in (os.listdir(out) if os.path.isdir(out) else ())
                      if n == "index.json" or (n.startswith("part-") and n.endswith(".h5")))
    if existing and not overwrite:
        raise UsageError(f"--out {out}: already holds a packed dataset ({existing[0]}); choose "
                         f"another --out, or add --overwrite to replace it")
    stale = [os.path.join(out, n) for n in existing
             if n != "index.json" and os.path.join(out, n) not in paths]
    return paths, stale


def pack(args) -> list[str]:
    shards = args.shards
    if shards < 1:
        raise UsageError(f"--shards must be >= 1, got {shards}")
    paths, stale = output_paths(args.out, shards, args.overwrite)
    if args.source == "synthetic":
        if args.normalize:
            raise UsageError("--normalize: the synthetic source is already float")
        if args.label_offset:
            raise UsageError("--label-offset: the synthetic source's labels already start at 0")
        if args.y_dtype != "auto":
            raise UsageError("--y-dtype: the synthetic source holds class labels")
        shape = tuple(int(s) for s in args.shape.split(","))
        n, classes = args.samples, args.classes
        blocks = lambda start, count: _slice_blocks(
            synthetic_blocks(n, shape, classes, args.seed, 0), start, count)
        source = f"synthetic (seed {args.seed})"
        target = Target(classes=classes)
    else:
        x, y = _check_arrays(*_load_arrays(args), args.source, args.y_dtype)
        n, shape = len(x), x.shape[1:]
        scale = x_scale(x, args.source, args.normalize)
        if np.issubdtype(y.dtype, np.integer):
            y = shift_labels(y, args.label_offset, args.source)
            check_labels(y, args.classes, args.source)
            classes = args.classes or int(y.max()) + 1
            if int(y.max()) >= classes:
                raise UsageError(f"--classes {classes}: label {int(y.max())} out of range")
        else:
            for flag, value in (("--classes", args.classes), ("--label-offset", args.label_offset)):
                if value:
                    raise UsageError(f"{flag}: y of --source {args.source} holds float targets, "
                                     f"not class labels")
            classes = 0
        target = target_of(y.dtype, y.shape[1:], classes)
        blocks = lambda start, count: _array_blocks(x, y, start, count, scale)
        builtin = args.source in ("digits", "diabetes")
        source = f"{args.source}" + (f" ({args.split} split)" if builtin else "")
        if scale != 1.0:
            source += f" (x scaled by {scale:.6g})"
    if n < shards:
        raise UsageError(f"--shards {shards}: more shards than samples ({n})")
    bounds = [n * i // shards for i in range(shards + 1)]
    for i, path in enumerate(paths):
        count = bounds[i + 1] - bounds[i]
        write_blocks(path, blocks(bounds[i], count), count, shape, classes, source,
                     chunk_rows=args.chunk_rows, compression=args.compression, target=target)
    if shards > 1:
        # the index last, once every shard it lists is complete
        paths.append(write_index(args.out, paths, [bounds[i + 1] - bounds[i] for i in range(shards)],
                                 shape, classes, source, target))
        for path in stale:  # shards of an earlier, larger pack (--overwrite)
            os.unlink(path)
    return paths


def _array_blocks(x, y, start: int, count: int, scale: float):
    """Samples [start, start+count) of arrays in memory, as float32 blocks of BLOCK_ROWS."""
    for a in range(start, start + count, BLOCK_ROWS):
        b = min(a + BLOCK_ROWS, start + count)
        xb = x[a:b].astype(np.float32)
        if scale != 1.0:
            xb *= np.float32(scale)
        yield xb, y[a:b]


def _slice_blocks(gen, start, count):
    """Samples [start, start+count) of a stream of blocks."""
    pos, end = 0, start + count
    for xb, yb in gen:
        a, b = max(start, pos), min(end, pos + len(xb))
        if a < b:
            yield xb[a - pos:b - pos], yb[a - pos:b - pos]
        pos += len(xb)
        if pos >= end:
            return


def info(path: str) -> str:
    ds = open_dataset(path, "info")
    target = ds.target
    what = (f"{ds.classes} classes" if target.kind == "class labels" else
            f"y: {target.describe()}")
    return (f"{path}: {ds.samples} samples in {len(ds.files)} file(s), sample shape "
            f"{ds.sample_shape}, {what}, chunk {ds.chunk} samples")


def main(argv=None) -> int:
    parser = Parser(prog="python -m hpcaccel.data", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack arrays into HDF5 (one file or N shards + index.json)")
    p.add_argument("--source", required=True, help="digits, diabetes, synthetic, FILE.npz or "
                   "FILE.npy")
    p.add_argument("--out", required=True, help="output .h5 file, or directory when --shards > 1")
    p.add_argument("--shards", type=int, default=1, help="number of files")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="digits or diabetes split")
    p.add_argument("--labels", help="y .npy: labels or targets (with a .npy --source)")
    p.add_argument("--x-key", default="x", help="npz key of the samples")
    p.add_argument("--y-key", default="y", help="npz key of y (labels or targets)")
    p.add_argument("--y-dtype", choices=("auto", "float32"), default="auto",
                   help="auto: integer y as labels (one per sample, or per element), float y "
                   "as float32 targets; float32: integer y as float targets too (regression)")
    p.add_argument("--samples", type=int, default=8192, help="synthetic: number of samples")
    p.add_argument("--shape", default="1,28,28", help="synthetic: sample shape")
    p.add_argument("--classes", type=int, default=None, help="number of classes "
                   "(synthetic default 10; arrays: max label + 1)")
    p.add_argument("--seed", type=int, default=0, help="synthetic: seed")
    p.add_argument("--chunk-rows", type=int, default=None, help="samples per HDF5 chunk "
                   "(default: about 1 MiB)")
    p.add_argument("--compression", choices=("gzip", "lzf"), default=None, help="chunk compression")
    p.add_argument("--normalize", action="store_true", help="scale integer samples into [0, 1]: "
                   "values in [0, 255] (8-bit images) by 1/255, other unsigned ones by 1/(type max)")
    p.add_argument("--label-offset", type=int, default=0, help="subtract this from every label "
                   "(labels numbered from 1: --label-offset 1 packs them from 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (file, or "
                   "the shards and index.json in the directory)")
    i = sub.add_parser("info", help="describe a packed file or shard index")
    i.add_argument("path")
    try:
        args = parser.parse_args(argv)
        if args.command == "pack":
            if args.source == "synthetic" and args.classes is None:
                args.classes = 10
            for path in pack(args):
                print(path)
        else:
            print(info(args.path))
    except UsageError as e:
        return usage_error("hpcaccel.data", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
