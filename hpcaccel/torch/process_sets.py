"""Horovod's process sets: only the global one (every rank of hvd.init()) is supported."""
from __future__ import annotations


class ProcessSet:
    """A set of ranks collectives can be limited to; here only the global set exists."""

    def __init__(self, ranks_or_comm=None):
        self.ranks = None if ranks_or_comm is None else ranks_or_comm
        self.process_set_id = 0 if ranks_or_comm is None else None

    def size(self) -> int:
        from .basics import size
        return size()

    def rank(self) -> int:
        from .basics import rank
        return rank()

    def included(self) -> bool:
        return True

    def __repr__(self):
        return "ProcessSet(process_set_id=0, global)"


global_process_set = ProcessSet()


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
