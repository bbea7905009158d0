"""Horovod's tensor collectives (horovod.torch.mpi_ops, 0.28.1 names, signatures and
semantics) on hpcaccel's collective engine (engine.py; the operations: collective_ops.py):
allgather, broadcast and reducescatter here, the allreduces from allreduces.py, handles and
barrier from calls.py, join from join_ops.py.

Names without a trailing `_` are out of place and differentiable (Horovod's gradients:
allreduce -> the same allreduce of the gradient; allgather -> averaged allreduce, then this
rank's rows; broadcast -> averaged allreduce, zero except on the root; reducescatter ->
allgather of the gradient, times size under Sum and times both factors); where no input
needs a gradient they skip autograd. Names with `_` work in place. `*_async*` return an int
handle for poll() and synchronize(); the operation runs in the engine's thread meanwhile
(or in the waiting thread, if it gets there first). Blocking calls run in the calling
thread where the engine is idle. Tensors on a GPU go through a host copy.
"""
from __future__ import annotations

import torch

from . import reduce_ops
from .allreduces import (allreduce, allreduce_, allreduce_async, allreduce_async_,  # noqa: F401
                         grouped_allreduce, grouped_allreduce_, grouped_allreduce_async,
                         grouped_allreduce_async_, HorovodAllreduce, HorovodGroupedAllreduce,
                         sparse_allreduce_async, tracked)
from .basics import Adasum, Average, Max, Min, OP_NAMES, Product, Sum, runtime  # noqa: F401
from .calls import (barrier, handle_average_backwards_compatibility, op_name,  # noqa: F401
                    poll, run_now, submit, synchronize)
from .collective_ops import AllgatherOp, BroadcastOp, ReducescatterOp
from .compression import Compression
from .errors import HorovodInternalError
from .join_ops import join  # noqa: F401 - Horovod's name, here with the other collectives
from .process_sets import check_process_set, global_process_set


# -- allgather -------------------------------------------------------------------------------


def _allgather_op(tensors, name, process_set, kind):
    check_process_set(process_set)
    for t in tensors:
        reduce_ops.check_tensor(t, kind)
    name, auto_named = op_name(name, kind)
    return AllgatherOp(name, list(tensors), single=kind == "allgather", auto_named=auto_named)


def allgather_async(tensor, name=None, process_set=global_process_set):
    """Start concatenating every rank's `tensor` along dimension 0 (which may differ per
    rank); returns a handle."""
    return submit(_allgather_op([tensor], name, process_set, "allgather"))


class HorovodAllgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name):
        op = _allgather_op([tensor], name, None, "allgather")
        result = run_now(op)
        ctx.dim, ctx.dims = tensor.shape[0], [rows[0] for rows in op.rows]
        return result

    @staticmethod
    def backward(ctx, grad_output):
        reduced = allreduce(grad_output, op=Average)
        offset = sum(ctx.dims[:runtime().rank])
        return reduced.narrow(0, offset, ctx.dim), None


def allgather(tensor, name=None, process_set=global_process_set):
    """Every rank's `tensor` concatenated along dimension 0 (which may differ per rank);
    differentiable."""
    check_process_set(process_set)
    if tracked((tensor,)):
        return HorovodAllgather.apply(tensor, name)
    return run_now(_allgather_op([tensor], name, None, "allgather"))


def grouped_allgather_async(tensors, name=None, process_set=global_process_set):
    """Start allgathers of a list of tensors as one operation; returns a handle."""
    return submit(_allgather_op(tensors, name, process_set, "grouped_allgather"))


class HorovodGroupedAllgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, *tensors):
        op = _allgather_op(list(tensors), name, None, "grouped_allgather")
        results = run_now(op)
        ctx.dims, ctx.all_dims = [t.shape[0] for t in tensors], op.rows
        return tuple(results)

    @staticmethod
    def backward(ctx, *grad_output):
        reduced = grouped_allreduce(list(grad_output), op=Average)
        me = runtime().rank
        out = []
        for k, g in enumerate(reduced):
            offset = sum(ctx.all_dims[r][k] for r in range(me))
            out.append(g.narrow(0, offset, ctx.dims[k]))
        return (None, *out)


def grouped_allgather(tensors, name=None, process_set=global_process_set):
    """allgather of each tensor of a list, as one operation; differentiable."""
    check_process_set(process_set)
    if tracked(tensors):
        return list(HorovodGroupedAllgather.apply(name, *tensors))
    return list(run_now(_allgather_op(list(tensors), name, None, "grouped_allgather")))


# -- broadcast -------------------------------------------------------------------------------


def _broadcast_op(tensor, output, root_rank, name, process_set):
    check_process_set(process_set)
    reduce_ops.check_tensor(tensor, "broadcast")
    size = runtime().size
    if not 0 <= int(root_rank) < size:
        raise ValueError(f"broadcast: root_rank {root_rank} is not a rank (0..{size - 1})")
    name, auto_named = op_name(name, "broadcast")
    return BroadcastOp(name, tensor, tensor if output is None else output, root_rank,
                       auto_named=auto_named)


def _new(tensor):
    """An output like `tensor` (checked first, as Horovod checks it)."""
    reduce_ops.check_tensor(tensor, "broadcast")
    return torch.empty_like(tensor)


def broadcast_async(tensor, root_rank, name=None, process_set=global_process_set):
    """Start copying root_rank's `tensor` to every rank into a new tensor; returns a handle."""
    return submit(_broadcast_op(tensor, _new(tensor), root_rank, name, process_set))


def broadcast_async_(tensor, root_rank, name=None, process_set=global_process_set):
    """Start overwriting `tensor` with root_rank's, in place; returns a handle."""
    return submit(_broadcast_op(tensor, None, root_rank, name, process_set))


class HorovodBroadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name):
        ctx.root_rank = root_rank
        return run_now(_broadcast_op(tensor, _new(tensor), root_rank, name, None))

    @staticmethod
    def backward(ctx, grad_output):
        reduced = allreduce(grad_output, op=Average)
        if runtime().rank != ctx.root_rank:
            reduced = reduced * 0
        return reduced, None, None


def broadcast(tensor, root_rank, name=None, process_set=global_process_set):
    """root_rank's `tensor` on every rank, as a new tensor; differentiable."""
    check_process_set(process_set)
    if tracked((tensor,)):
        return HorovodBroadcast.apply(tensor, root_rank, name)
    return run_now(_broadcast_op(tensor, _new(tensor), root_rank, name, None))


def broadcast_(tensor, root_rank, name=None, process_set=global_process_set):
    """Overwrite `tensor` with root_rank's, in place; returns it."""
    return run_now(_broadcast_op(tensor, None, root_rank, name, process_set))


# -- reducescatter ---------------------------------------------------------------------------


def _reducescatter_op(tensors, name, op, process_set, prescale_factor, postscale_factor, kind):
    check_process_set(process_set)
    for t in tensors:
        reduce_ops.check_tensor(t, kind)
        if t.dim() == 0:  # Horovod refuses it at the call (a ValueError), before any rank waits
            raise ValueError(f"{kind}: a 0-d tensor has no first dimension to scatter")
    if op not in (Average, Sum):  # Horovod: a RuntimeError at the call, as HorovodInternalError
        raise HorovodInternalError(f"{kind} supports op=hvd.Average and op=hvd.Sum only; got "
                                   f"{OP_NAMES.get(op, repr(op))}")
    name, auto_named = op_name(name, kind)
    return ReducescatterOp(name, list(tensors), op, prescale_factor, postscale_factor,
                           single=kind == "reducescatter", auto_named=auto_named)


def reducescatter_async(tensor, name=None, op=Average, process_set=global_process_set,
                        prescale_factor=1.0, postscale_factor=1.0):
    """Start reducing `tensor` over all ranks (op Average or Sum; same shape everywhere)
    and keeping this rank's share of dimension 0 (rows // size, one more on each of the
    first rows % size ranks); returns a handle. `tensor` is not modified."""
    return submit(_reducescatter_op([tensor], name, op, process_set, prescale_factor,
                                    postscale_factor, "reducescatter"))


def _reducescatter_grad(grad, op, prescale_factor, postscale_factor):
    """Horovod's gradient scale before the allgather: size under Sum, 1 under Average, then
    both factors (so n times the exact gradient of the summed outputs, as Horovod defines
    it; applied one factor at a time, as Horovod rounds)."""
    for factor in (runtime().size if op == Sum else 1, prescale_factor, postscale_factor):
        if factor != 1:
            grad = grad * factor
    return grad


class HorovodReducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op, process_set, prescale_factor, postscale_factor):
        ctx.args = (op, prescale_factor, postscale_factor)
        return run_now(_reducescatter_op([tensor], name, op, process_set, prescale_factor,
                                         postscale_factor, "reducescatter"))

    @staticmethod
    def backward(ctx, grad_output):
        return allgather(_reducescatter_grad(grad_output, *ctx.args)), \
            None, None, None, None, None


def reducescatter(tensor, name=None, compression=Compression.none, op=Average,
                  process_set=global_process_set, prescale_factor=1.0, postscale_factor=1.0):
    """`tensor` reduced over all ranks (default: averaged), this rank's share of dimension
    0 as a new tensor (see reducescatter_async); differentiable (gradient: an allgather)."""
    check_process_set(process_set)
    compressed, ctx = compression.compress(tensor)
    if tracked((compressed,)):
        reduced = HorovodReducescatter.apply(compressed, name, op, process_set,
                                             prescale_factor, postscale_factor)
    else:
        reduced = run_now(_reducescatter_op([compressed], name, op, process_set,
                                            prescale_factor, postscale_factor, "reducescatter"))
    return compression.decompress(reduced, ctx)


def grouped_reducescatter_async(tensors, name=None, op=Average, process_set=global_process_set,
                                prescale_factor=1.0, postscale_factor=1.0):
    """Start reducescatters of a list of tensors as one fused operation; returns a handle."""
    return submit(_reducescatter_op(tensors, name, op, process_set, prescale_factor,
                                    postscale_factor, "grouped_reducescatter"))


class HorovodGroupedReducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, op, process_set, prescale_factor, postscale_factor, *tensors):
        ctx.args = (op, prescale_factor, postscale_factor)
        return tuple(run_now(_reducescatter_op(list(tensors), name, op, process_set,
                                               prescale_factor, postscale_factor,
                                               "grouped_reducescatter")))

    @staticmethod
    def backward(ctx, *grad_output):
        grads = [_reducescatter_grad(g, *ctx.args) for g in grad_output]
        return (None, None, None, None, None, *grouped_allgather(grads))


def grouped_reducescatter(tensors, name=None, compression=Compression.none, op=Average,
                          process_set=global_process_set, prescale_factor=1.0,
                          postscale_factor=1.0):
    """reducescatter of each tensor of a list, as one fused operation; differentiable."""
    check_process_set(process_set)
    packed = [compression.compress(t) for t in tensors]
    compressed = [t for t, _ in packed]
    if tracked(compressed):
        reduced = HorovodGroupedReducescatter.apply(name, op, process_set, prescale_factor,
                                                    postscale_factor, *compressed)
    else:
        reduced = run_now(_reducescatter_op(compressed, name, op, process_set, prescale_factor,
                                            postscale_factor, "grouped_reducescatter"))
    return [compression.decompress(t, ctx) for t, (_, ctx) in zip(reduced, packed)]


# -- not provided ------------------------------------------------------------------------------


def alltoall(tensor, splits=None, name=None, process_set=global_process_set):
    from .unsupported import not_supported
    not_supported("alltoall", instead="allgather and keep your part")


alltoall_async = alltoall


__all__ = [n for n in dir() if not n.startswith("_") and n not in (
    "annotations", "torch", "reduce_ops", "AllgatherOp", "BroadcastOp", "ReducescatterOp",
    "runtime", "check_process_set", "op_name", "run_now", "submit", "tracked",
    "HorovodInternalError")]
