"""Horovod's process sets: only the global one (every rank of hvd.init()) is supported.

The set learns this process's rank and size from hvd.init() (basics.py calls `attach`), so
it needs nothing from the modules that start the job."""
from __future__ import annotations

from .errors import not_initialized


class ProcessSet:
    """A set of ranks collectives can be limited to; here only the global set exists."""

    _where = None  # (rank, size) of this process in the global set, while initialized

    def __init__(self, ranks_or_comm=None):
        self.ranks = None if ranks_or_comm is None else ranks_or_comm
        self.process_set_id = 0 if ranks_or_comm is None else None

    def size(self) -> int:
        return self._attached()[1]

    def rank(self) -> int:
        return self._attached()[0]

    def _attached(self) -> tuple[int, int]:
        if ProcessSet._where is None:
            raise not_initialized()
        return ProcessSet._where

    def included(self) -> bool:
        return True

    def __repr__(self):
        return "ProcessSet(process_set_id=0, global)"


global_process_set = ProcessSet()


def attach(rank: int | None, size: int | None = None) -> None:
    """Local. hvd.init() gives the global set this process's rank and the job's size; None
    (hvd.shutdown()): not initialized."""
    ProcessSet._where = None if rank is None else (int(rank), int(size))


def only_global(process_sets) -> bool:
    """init(process_sets=...) names nothing but the global set."""
    sets = process_sets if isinstance(process_sets, (list, tuple)) else [process_sets]
    return all(s is global_process_set for s in sets)


def check_process_set(process_set) -> None:
    if process_set is not None and process_set is not global_process_set:
        from .unsupported import not_supported
        not_supported("process sets other than the global one",
                      instead="hvd.init(comm=...) with the ranks that should take part")


def add_process_set(process_set, *args, **kwargs):
    from .unsupported import not_supported
    not_supported("add_process_set", instead="hvd.init(comm=...) with the ranks that should "
                  "take part")


remove_process_set = add_process_set
