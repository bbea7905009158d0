"""hvd.allreduce and its variants (horovod.torch.mpi_ops, 0.28.1 names, signatures and
semantics): in place (`allreduce_`), started (`allreduce_async`, a handle for synchronize())
and grouped (several tensors, one fused operation). The out-of-place ones are
differentiable, as Horovod's: the gradient is the same allreduce of the gradient; where no
input needs a gradient they skip autograd. mpi_ops.py exports them with the others.
"""
from __future__ import annotations

import torch

from . import reduce_ops
from .calls import check_op, handle_average_backwards_compatibility, op_name, run_now, submit
from .collective_ops import AllreduceOp
from .compression import Compression
from .process_sets import check_process_set, global_process_set


def tracked(tensors) -> bool:
    """Whether autograd records a call on `tensors` (any needs a gradient)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# -- allreduce -------------------------------------------------------------------------------


def _allreduce_op(tensors, outputs, name, op, prescale_factor, postscale_factor, process_set,
                  kind="allreduce"):
    """The operation reducing `tensors` into `outputs` (None: new tensors like them)."""
    check_process_set(process_set)
    check_op(op)
    for t in tensors:
        reduce_ops.check_tensor(t, kind)
    if outputs is None:
        outputs = [torch.empty_like(t) for t in tensors]
    name, auto_named = op_name(name, kind)
    return AllreduceOp(name, list(tensors), list(outputs), op, prescale_factor,
                       postscale_factor, single=kind == "allreduce", auto_named=auto_named)


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0,
                    postscale_factor=1.0, process_set=global_process_set):
    """Start reducing `tensor` over all ranks (default: the average) into a new tensor;
    returns a handle. `tensor` is not modified."""
    op = handle_average_backwards_compatibility(op, average)
    output = torch.empty_like(tensor)
    return submit(_allreduce_op([tensor], [output], name, op, prescale_factor,
                                postscale_factor, process_set))


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0,
                     postscale_factor=1.0, process_set=global_process_set):
    """Start reducing `tensor` in place; returns a handle."""
    op = handle_average_backwards_compatibility(op, average)
    return submit(_allreduce_op([tensor], [tensor], name, op, prescale_factor,
                                postscale_factor, process_set))


class HorovodAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op, prescale_factor, postscale_factor):
        ctx.args = (op, prescale_factor, postscale_factor)
        return run_now(_allreduce_op([tensor], None, name, op, prescale_factor,
                                     postscale_factor, None))

    @staticmethod
    def backward(ctx, grad_output):
        op, pre, post = ctx.args
        return allreduce(grad_output, op=op, prescale_factor=pre, postscale_factor=post), \
            None, None, None, None


def allreduce(tensor, average=None, name=None, compression=Compression.none, op=None,
              prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set):
    """`tensor` reduced over all ranks (default: averaged), as a new tensor; differentiable.
    compression: how it travels (Compression.fp16: as float16)."""
    op = handle_average_backwards_compatibility(op, average)
    check_process_set(process_set)
    compressed, ctx = compression.compress(tensor)
    if tracked((compressed,)):
        reduced = HorovodAllreduce.apply(compressed, name, op, prescale_factor, postscale_factor)
    else:
        reduced = run_now(_allreduce_op([compressed], None, name, op, prescale_factor,
                                        postscale_factor, None))
    return compression.decompress(reduced, ctx)


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0,
               postscale_factor=1.0, process_set=global_process_set):
    """Reduce `tensor` over all ranks in place (default: average); returns it."""
    op = handle_average_backwards_compatibility(op, average)
    return run_now(_allreduce_op([tensor], [tensor], name, op, prescale_factor,
                                 postscale_factor, process_set))


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                            postscale_factor=1.0, process_set=global_process_set):
    """One fused reduction of a list of tensors into new tensors; returns a handle."""
    op = handle_average_backwards_compatibility(op, average)
    outputs = [torch.empty_like(t) for t in tensors]
    return submit(_allreduce_op(tensors, outputs, name, op, prescale_factor, postscale_factor,
                                process_set, kind="grouped_allreduce"))


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                             postscale_factor=1.0, process_set=global_process_set):
    """One fused in-place reduction of a list of tensors; returns a handle."""
    op = handle_average_backwards_compatibility(op, average)
    return submit(_allreduce_op(tensors, tensors, name, op, prescale_factor, postscale_factor,
                                process_set, kind="grouped_allreduce"))


class HorovodGroupedAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, op, prescale_factor, postscale_factor, *tensors):
        ctx.args = (op, prescale_factor, postscale_factor)
        return tuple(run_now(_allreduce_op(list(tensors), None, name, op, prescale_factor,
                                           postscale_factor, None, "grouped_allreduce")))

    @staticmethod
    def backward(ctx, *grad_output):
        op, pre, post = ctx.args
        grads = grouped_allreduce(list(grad_output), op=op, prescale_factor=pre,
                                  postscale_factor=post)
        return (None, None, None, None, *grads)


def grouped_allreduce(tensors, average=None, name=None, compression=Compression.none, op=None,
                      prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set):
    """A list of tensors reduced in one fused operation, as new tensors; differentiable."""
    op = handle_average_backwards_compatibility(op, average)
    check_process_set(process_set)
    packed = [compression.compress(t) for t in tensors]
    compressed = [t for t, _ in packed]
    if tracked(compressed):
        reduced = HorovodGroupedAllreduce.apply(name, op, prescale_factor, postscale_factor,
                                                *compressed)
    else:
        reduced = run_now(_allreduce_op(compressed, None, name, op, prescale_factor,
                                        postscale_factor, None, "grouped_allreduce"))
    return [compression.decompress(t, ctx) for t, (_, ctx) in zip(reduced, packed)]


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                       postscale_factor=1.0, process_set=global_process_set):
    """Reduce a list of tensors in place in one fused operation; returns the list."""
    op = handle_average_backwards_compatibility(op, average)
    return run_now(_allreduce_op(tensors, tensors, name, op, prescale_factor, postscale_factor,
                                 process_set, kind="grouped_allreduce"))


def sparse_allreduce_async(tensor, name, op, process_set=global_process_set):
    from .unsupported import not_supported
    not_supported("sparse_allreduce_async", instead="tensor.to_dense() with allreduce_async, or "
                  "DistributedOptimizer(sparse_as_dense=True)")
