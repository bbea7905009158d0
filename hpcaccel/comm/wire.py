"""What travels for an mpi reducer bucket, and how its sum becomes the mean.

Compression (fp16/bf16): the buckets stay full precision. When its allreduce starts (in the
communication thread with overlap=thread) a bucket is rounded into a 16-bit wire buffer,
which is allreduced with a user-defined MPI sum (MPI has no 16-bit float sum) and widened
back before the division: half the bytes travel. Costs measured in docs/backends.md.

Compression powersgd: matrix-shaped parameters worth it (powersgd.compressible) get buckets
of their own (buckets.py), laid out and started in the same index order as the others; such
a bucket travels as PowerSGD factors (powersgd.py: P with the used flags, then Q, each
through the allreduce algorithm) once the first --powersgd-start-step steps, which go exact,
are done.

After the sum, op "average" divides the gradients by the world size (a predivide factor f
scales them by 1/f before the sum and by f/size after it, as Horovod's
gradient_predivide_factor); op "sum" leaves them as they are. The used flags stay counts.

Cross-rank invariant: the wire and the scaling are the reducer's settings, the same on
every rank, so ranks stay bit-for-bit identical.
"""
from __future__ import annotations

import torch

WIRE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_wire_sums = {}  # torch dtype -> MPI.Op, created once per process


def wire_sum_op(dtype: torch.dtype):
    """The MPI sum of 16-bit floats of `dtype`, carried as MPI 16-bit integers.

    MPI calls it on chunks of the message; torch adds them in place (one rounding per
    addition, as any 16-bit float sum does). torch, not numpy: numpy's float16 add is about
    50 times slower (53 ms vs 1.0 ms for 6.5 M elements, measured) and has no bfloat16.
    """
    if dtype not in _wire_sums:
        from mpi4py import MPI

        def add(inbuf, inoutbuf, datatype):
            if len(inbuf):
                torch.frombuffer(inoutbuf, dtype=dtype).add_(torch.frombuffer(inbuf, dtype=dtype))
        _wire_sums[dtype] = MPI.Op.Create(add, commute=True)
    return _wire_sums[dtype]


def on_wire(b, predivide_factor: float, wire_op):
    """(buffer, op) that MPI reduces for bucket b: the bucket, or its 16-bit copy, which
    this rounds from the bucket now (in whichever thread runs the allreduce). A
    predivide factor f scales the gradients by 1/f first. `wire_op`: wire_sum_op of the
    16-bit wire's dtype."""
    from mpi4py import MPI

    if predivide_factor != 1.0:
        b.flat[:b.numel].mul_(1.0 / predivide_factor)
    if b.wire is None:
        return b.array, MPI.SUM
    b.wire.copy_(b.flat)
    if not b.wire_16bit:
        return b.wire_array, MPI.SUM  # host copy of a GPU bucket
    return [b.wire_array, MPI.INT16_T], wire_op


def average(b, op: str, predivide_factor: float, size: int) -> None:
    """After the sum: back from the wire buffer (if any) into the bucket, then divide the
    gradients (not the flags, which stay counts) by the world size (op average; times
    f/size with a predivide factor f; op sum: left as they are). Buckets exist only on
    communicators of more than one rank."""
    if b.wire is not None:
        b.flat.copy_(b.wire)
    if op == "sum":
        return
    if predivide_factor == 1.0:
        b.flat[:b.numel].div_(size)
    else:
        b.flat[:b.numel].mul_(predivide_factor / size)


def powersgd_mean(b, compressor, allreduce_) -> None:
    """The bucket's gradients replaced by the PowerSGD approximation of their mean
    (`compressor`: the reducer's PowerSGD; `allreduce_`: its sum over ranks in place); the
    used flags ride with P, so a parameter no rank touched keeps its error feedback."""
    views = [b.view(i) for i in range(len(b.params))]
    used = compressor.average_(b.psgd, views, lambda t: allreduce_(t), extra=b.flags,
                               skip=lambda used: (used == 0).tolist())
    b.flags.copy_(used)
