"""Built-in data sources, packed to HDF5 in a cache directory on first use.

digits: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes,
        no download); fixed split of 1,437 train / 360 test samples.
synthetic: any number of samples of any shape; labels come from a fixed random linear
        teacher, so the task is learnable and accuracy means something.
diabetes: regression, embedded in the package (diabetes.csv.gz, BSD-3-Clause, see
        diabetes-NOTICE.txt): 442 patients, 10 baseline variables, and disease progression
        a year later as the target; fixed split of 353 train / 89 test samples; features
        and target standardised with the training split's mean and standard deviation.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile

import numpy as np

from .hdf5 import write_blocks, write_file

DIGITS_TEST = 360
DIABETES_TEST = 89
BUILTINS = ("digits", "synthetic", "diabetes")


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


def diabetes_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The embedded diabetes data as measured: x (442, 10) float64, y (442,) float64."""
    import gzip

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "diabetes.csv.gz")
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", skiprows=1, dtype=np.float64)
    return table[:, :10], table[:, 10]


def diabetes_split():
    """((x, y) train, (x, y) test): x (N, 10) and y (N,) float32, both standardised with the
    training split's mean and standard deviation (so a model's RMSE is in units of the
    target's spread; before, y's are about 152 and 77)."""
    x, y = diabetes_arrays()
    perm = np.random.default_rng(20240442).permutation(len(x))  # fixed forever: same split
    test, train = perm[:DIABETES_TEST], perm[DIABETES_TEST:]
    x_mean, x_std = x[train].mean(axis=0), x[train].std(axis=0)
    y_mean, y_std = y[train].mean(), y[train].std()
    x, y = ((x - x_mean) / x_std).astype(np.float32), ((y - y_mean) / y_std).astype(np.float32)
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
    if name in ("digits", "diabetes"):
        key = f"{name}-v1"
    else:
        key = f"synthetic-v1-n{samples}-s{'x'.join(map(str, shape))}-c{classes}-seed{seed}"
    base = os.path.join(cache_dir(), key)
    return os.path.join(base, "train.h5"), os.path.join(base, "test.h5")


def pack_builtin(name: str, samples: int, shape, classes: int, seed: int) -> tuple[str, str]:
    """Pack a built-in source into its cache directory if not there yet; return the paths.

    Safe to call concurrently, also from several nodes on a shared filesystem: each packer
    writes both files into a private directory and publishes it with one rename. The first
    packer's directory wins; later ones find it complete and discard their own, identical
    copy. So a published file is never replaced (a reader on another node cannot see it
    change under it) and nobody ever sees train.h5 without test.h5 or a file half written.
    """
    train, test = builtin_paths(name, samples, shape, classes, seed)
    if os.path.exists(train) and os.path.exists(test):
        return train, test
    final = os.path.dirname(train)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    try:
        _write_builtin(name, samples, shape, classes, seed, staging)
        _publish(staging, final, complete=lambda: os.path.exists(train) and os.path.exists(test))
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # ours lost the race, or failed
    return train, test


def _write_builtin(name, samples, shape, classes, seed, directory) -> None:
    train, test = os.path.join(directory, "train.h5"), os.path.join(directory, "test.h5")
    if name == "digits":
        (xt, yt), (xv, yv) = digits_split()
        write_file(train, [xt], [yt], len(xt), (1, 8, 8), 10, "sklearn digits (train split)")
        write_file(test, [xv], [yv], len(xv), (1, 8, 8), 10, "sklearn digits (test split)")
    elif name == "diabetes":
        for path, (xs, ys), split in zip((train, test), diabetes_split(), ("train", "test")):
            write_file(path, [xs], [ys], len(xs), (10,), 0,
                       f"diabetes (Efron et al. 2004, via scikit-learn; {split} split; "
                       f"standardised)")
    else:
        n_test = max(1, samples // 8)
        for path, n, stream in ((train, samples, 0), (test, n_test, 1)):
            write_blocks(path, synthetic_blocks(n, shape, classes, seed, stream), n, shape,
                         classes, f"synthetic (seed {seed}, {'test' if stream else 'train'})")


def _publish(staging: str, final: str, complete) -> None:
    """Rename `staging` to `final` unless another packer already published a complete one.
    An incomplete `final` (left by a packer of an older version that wrote files one by
    one and was killed) is moved aside first."""
    for _ in range(3):
        try:
            os.rename(staging, final)  # atomic; fails if `final` exists and is not empty
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if complete():
            return  # another packer won; its files equal ours
        aside = tempfile.mktemp(prefix=f".{os.path.basename(final)}.old-", dir=os.path.dirname(final))
        try:
            os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        except FileNotFoundError:
            pass  # another packer moved it aside first
    raise OSError(f"{final}: could not publish packed data (keeps reappearing incomplete)")
