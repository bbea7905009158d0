"""What every hpcaccel.torch tensor call shares: Horovod's argument handling, the
operations' names, handing an operation to the engine (submit: a handle; run_now: the
result) and the handles themselves (poll, synchronize), and barrier().
"""
from __future__ import annotations

import warnings

from .basics import Adasum, Average, OP_NAMES, Sum, runtime
from .collective_ops import BarrierOp
from .engine import Operation
from .process_sets import check_process_set, global_process_set


def handle_average_backwards_compatibility(op, average):
    """Horovod's deprecated `average=`: True -> Average, False -> Sum; both given is an
    error; neither -> Average."""
    if op is not None:
        if average is not None:
            raise ValueError("The op parameter supersedes average. Please provide only one of them.")
        return op
    if average is not None:
        warnings.warn("Parameter `average` has been replaced with `op` and will be removed "
                      "in v1.0", DeprecationWarning)
        return Average if average else Sum
    return Average


def check_op(op) -> None:
    if op not in OP_NAMES:
        raise ValueError(f"op must be one of hvd.Average, Sum, Adasum, Min, Max, Product; got {op!r}")
    if op == Adasum and runtime().size > 1:
        from .unsupported import not_supported
        not_supported("op=Adasum at more than one rank", instead="op=hvd.Average")


def op_name(name, kind) -> tuple[str, bool | None]:
    """(name, auto_named) for an operation: the caller's `name`, or the engine's next
    generated one (True); None: tell by the name (Operation)."""
    if name is not None:
        return name, None
    return runtime().engine.auto_name(kind), True


def submit(op: Operation) -> int:
    """Start `op` (after what this rank submitted before); its handle."""
    return runtime().engine.submit(op)


def run_now(op: Operation):
    """Run `op` (after what this rank submitted before) and return its result; in the
    calling thread where the engine is idle. HorovodInternalError if it failed."""
    return runtime().engine.call(op)


def poll(handle) -> bool:
    """Has the operation of `handle` finished (synchronize() would not block)?"""
    return runtime().engine.poll(handle)


def synchronize(handle):
    """Wait for the operation of `handle`; its result (a tensor, or a list for grouped
    operations). HorovodInternalError if it failed (on every rank it failed on)."""
    return runtime().engine.wait(handle)


def barrier(process_set=global_process_set):
    """Wait until every rank has called barrier()."""
    check_process_set(process_set)
    run_now(BarrierOp(*op_name(None, "barrier")))
