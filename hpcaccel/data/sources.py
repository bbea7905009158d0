"""Built-in data sources, packed to HDF5 in a cache directory on first use.

digits: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes,
        no download); fixed split of 1,437 train / 360 test samples.
synthetic: any number of samples of any shape; labels come from a fixed random linear
        teacher, so the task is learnable and accuracy means something.
"""
from __future__ import annotations

import os

import numpy as np

from .hdf5 import write_blocks, write_file

DIGITS_TEST = 360
BUILTINS = ("digits", "synthetic")


def cache_dir() -> str:
    return os.environ.get("HPCACCEL_DATA") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hpcaccel", "data")


def digits_split():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(20240101).permutation(len(x))  # fixed forever: same split
    test, train = perm[:DIGITS_TEST], perm[DIGITS_TEST:]
    return (x[train], y[train]), (x[test], y[test])


def synthetic_blocks(n: int, shape, classes: int, seed: int, stream: int, rows: int = 4096):
    """Yield (x, y) blocks of a synthetic dataset. Deterministic in (seed, stream, block):
    any block can be regenerated alone, so data of any size is written in bounded memory."""
    dim = int(np.prod(shape))
    teacher = np.random.default_rng([seed, 7]).standard_normal((dim, classes)).astype(np.float32)
    teacher /= np.sqrt(dim)
    for b, start in enumerate(range(0, n, rows)):
        k = min(rows, n - start)
        x = np.random.default_rng([seed, stream, b]).standard_normal((k, dim)).astype(np.float32)
        y = np.argmax(x @ teacher, axis=1).astype(np.int64)
        yield x.reshape(k, *shape), y


def builtin_paths(name: str, samples: int, shape, classes: int, seed: int) -> tuple[str, str]:
    if name == "digits":
        key = "digits-v1"
    else:
        key = f"synthetic-v1-n{samples}-s{'x'.join(map(str, shape))}-c{classes}-seed{seed}"
    base = os.path.join(cache_dir(), key)
    return os.path.join(base, "train.h5"), os.path.join(base, "test.h5")


def pack_builtin(name: str, samples: int, shape, classes: int, seed: int) -> tuple[str, str]:
    """Pack a built-in source into its cache directory if not there yet; return the paths.
    Safe to call concurrently: files appear atomically, complete or not at all."""
    train, test = builtin_paths(name, samples, shape, classes, seed)
    if os.path.exists(train) and os.path.exists(test):
        return train, test
    if name == "digits":
        (xt, yt), (xv, yv) = digits_split()
        write_file(train, [xt], [yt], len(xt), (1, 8, 8), 10, "sklearn digits (train split)")
        write_file(test, [xv], [yv], len(xv), (1, 8, 8), 10, "sklearn digits (test split)")
    else:
        n_test = max(1, samples // 8)
        for path, n, stream in ((train, samples, 0), (test, n_test, 1)):
            write_blocks(path, synthetic_blocks(n, shape, classes, seed, stream), n, shape,
                         classes, f"synthetic (seed {seed}, {'test' if stream else 'train'})")
    return train, test
