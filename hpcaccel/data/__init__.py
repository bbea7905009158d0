"""Datasets: HDF5 files (or shard sets) read per rank; built-in sources packed on first use."""
from __future__ import annotations

from .files import COUNTERS
from .hdf5 import H5Dataset, Target, open_dataset, scan, write_blocks, write_file, write_index
from .reader import RankReader, eval_batches, first_batch
from .sources import BUILTINS, pack_builtin


def resolve(data: str, test_data: str | None, *, samples: int, shape, classes: int, seed: int,
            pack: bool, wait, inspect: bool = True, share=None,
            flags: tuple[str, str] = ("--data", "--test-data")) -> tuple[H5Dataset, H5Dataset | None]:
    """Turn --data/--test-data into datasets (metadata: files, lengths, shape, classes).
    `flags`: how errors name the two (a script's call names its own arguments).

    Collective when `share` is given. Built-in sources are packed by the ranks with `pack`
    True (one per node) while the others wait in `wait(error)`, a collective that raises on
    every rank if packing failed on any. The metadata is read once: only ranks with
    `inspect` True (rank 0) read the index and open each file, `wait` agrees on the outcome
    (a bad file fails every rank with its one line), and `share` (a broadcast from rank 0)
    hands the result to every rank, so start-up opens each file once whatever the rank count.
    Without `share` every caller inspects for itself (one process).
    """
    if data in BUILTINS:
        error = None
        if pack:
            try:
                pack_builtin(data, samples, shape, classes, seed)
            except Exception as e:  # reported on every rank by wait()
                error = e
        wait(error)
    result, error = None, None
    if inspect or share is None:
        try:
            result = _open_both(data, test_data, samples, shape, classes, seed, flags)
        except Exception as e:  # reported on every rank by wait()
            error = e
    wait(error)
    return share(result) if share is not None else result


def require_samples(ds: H5Dataset, batch: int, world: int, flag: str = "--data",
                    batch_flag: str = "--batch-size") -> None:
    """UsageError unless every rank gets at least one batch per epoch."""
    from ..errors import UsageError

    need = batch * world
    if ds.samples < need:
        raise UsageError(f"{flag} {ds.files[0]}: {ds.samples} samples, fewer than "
                         f"ranks x {batch_flag} = {world} x {batch} = {need}")


def _open_both(data, test_data, samples, shape, classes, seed, flags=("--data", "--test-data")):
    if data in BUILTINS:
        train_path, test_path = pack_builtin(data, samples, shape, classes, seed)
        train = open_dataset(train_path)
        test = open_dataset(test_path) if test_data is None else None
    else:
        train = open_dataset(data, flags[0])
        test = None
    if test_data is not None:
        test = open_dataset(test_data, flags[1])
    if test is not None and (test.sample_shape != train.sample_shape or test.target != train.target):
        raise_mismatch(train, test, flags[1])
    return train, test


def raise_mismatch(train: H5Dataset, test: H5Dataset, flag: str = "--test-data"):
    from ..errors import UsageError
    if test.sample_shape == train.sample_shape and test.target.kind != train.target.kind:
        raise UsageError(f"{flag} {test.files[0]}: y holds {test.target.describe()}, the "
                         f"training data {train.target.describe()}")
    raise UsageError(f"{flag} {test.files[0]}: sample shape {test.sample_shape} / "
                     f"{test.target.describe()} differ from the training data "
                     f"({train.sample_shape} / {train.target.describe()})")


__all__ = ["COUNTERS", "H5Dataset", "RankReader", "eval_batches", "first_batch", "open_dataset",
           "scan", "write_blocks", "write_file", "write_index", "resolve", "require_samples",
           "BUILTINS"]
