"""Pack arrays into hpcaccel's HDF5 format, or describe a packed dataset.

  python -m hpcaccel.data pack --source digits --split train --out digits-train.h5
  python -m hpcaccel.data pack --source synthetic --samples 100000 --shape 3,32,32 \\
      --classes 10 --shards 8 --out /scratch/synth          # 8 files + index.json
  python -m hpcaccel.data pack --source arrays.npz --out data.h5   # keys x and y
  python -m hpcaccel.data pack --source x.npy --labels y.npy --out data.h5
  python -m hpcaccel.data info data.h5
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ..cli import Parser, usage_error
from ..errors import UsageError
from .hdf5 import open_dataset, write_file, write_index
from .sources import digits_split, synthetic_blocks


def _load_arrays(args):
    src = args.source
    if src == "digits":
        train, test = digits_split()
        return train if args.split == "train" else test
    if not os.path.exists(src):
        raise UsageError(f"--source {src}: no such file (or built-in source: digits, synthetic)")
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


def _check_arrays(x, y, source):
    if len(x) != len(y):
        raise UsageError(f"--source {source}: x has {len(x)} samples but y has {len(y)}")
    if len(x) == 0:
        raise UsageError(f"--source {source}: no samples")
    if x.ndim < 2:
        x = x.reshape(len(x), 1)
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise UsageError(f"--source {source}: labels must be a 1-d integer array, got {y.dtype} {y.shape}")
    if y.min() < 0:
        raise UsageError(f"--source {source}: negative label {int(y.min())}")
    if not np.all(np.isfinite(x)):
        raise UsageError(f"--source {source}: x contains NaN or inf")
    return x, y


def pack(args) -> list[str]:
    shards = args.shards
    if shards < 1:
        raise UsageError(f"--shards must be >= 1, got {shards}")
    if args.source == "synthetic":
        shape = tuple(int(s) for s in args.shape.split(","))
        n, classes = args.samples, args.classes
        blocks = lambda start, count: _slice_blocks(
            synthetic_blocks(n, shape, classes, args.seed, 0), start, count)
        source = f"synthetic (seed {args.seed})"
    else:
        x, y = _check_arrays(*_load_arrays(args), args.source)
        n, shape = len(x), x.shape[1:]
        classes = args.classes or int(y.max()) + 1
        if int(y.max()) >= classes:
            raise UsageError(f"--classes {classes}: label {int(y.max())} out of range")
        blocks = lambda start, count: iter([(x[start:start + count], y[start:start + count])])
        source = f"{args.source}" + (f" ({args.split} split)" if args.source == "digits" else "")
    if n < shards:
        raise UsageError(f"--shards {shards}: more shards than samples ({n})")
    if shards == 1:
        paths, lengths = [args.out], [n]
    else:
        os.makedirs(args.out, exist_ok=True)
        bounds = [n * i // shards for i in range(shards + 1)]
        paths = [os.path.join(args.out, f"part-{i:05d}.h5") for i in range(shards)]
        lengths = [bounds[i + 1] - bounds[i] for i in range(shards)]
    start = 0
    for path, count in zip(paths, lengths):
        parts = list(blocks(start, count))
        write_file(path, [p[0] for p in parts], [p[1] for p in parts], count, shape, classes,
                   source, chunk_rows=args.chunk_rows, compression=args.compression)
        start += count
    if shards > 1:
        paths.append(write_index(args.out, paths, lengths, shape, classes, source))
    return paths


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
    ds = open_dataset(path, "PATH")
    return (f"{path}: {ds.samples} samples in {len(ds.files)} file(s), sample shape "
            f"{ds.sample_shape}, {ds.classes} classes, chunk {ds.chunk} samples")


def main(argv=None) -> int:
    parser = Parser(prog="python -m hpcaccel.data", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack arrays into HDF5 (one file or N shards + index.json)")
    p.add_argument("--source", required=True, help="digits, synthetic, FILE.npz or FILE.npy")
    p.add_argument("--out", required=True, help="output .h5 file, or directory when --shards > 1")
    p.add_argument("--shards", type=int, default=1, help="number of files")
    p.add_argument("--split", choices=("train", "test"), default="train", help="digits split")
    p.add_argument("--labels", help="labels .npy (with a .npy --source)")
    p.add_argument("--x-key", default="x", help="npz key of the samples")
    p.add_argument("--y-key", default="y", help="npz key of the labels")
    p.add_argument("--samples", type=int, default=8192, help="synthetic: number of samples")
    p.add_argument("--shape", default="1,28,28", help="synthetic: sample shape")
    p.add_argument("--classes", type=int, default=None, help="number of classes "
                   "(synthetic default 10; arrays: max label + 1)")
    p.add_argument("--seed", type=int, default=0, help="synthetic: seed")
    p.add_argument("--chunk-rows", type=int, default=None, help="samples per HDF5 chunk "
                   "(default: about 1 MiB)")
    p.add_argument("--compression", choices=("gzip", "lzf"), default=None, help="chunk compression")
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
