"""A joined rank's part in a gradient exchange (hvd.join(), hpcaccel/torch/join_ops.py): every
bucket of the mpi reducer reduced with zeros, in index order, by the same MPI calls the
other ranks' buckets make (the allreduce algorithm, on the 16-bit wire where compressed;
one nonblocking MPI_Iallreduce per bucket with overlap nonblocking, which a blocking
allreduce would not match). All "used" flags are 0, so a parameter that no other rank has
a gradient for gets none. The rank's own gradients and buckets are left alone.

Cross-rank invariant: bucket layout, order and wire are the same on every rank (checked
when the optimizer was wrapped), so each zero bucket matches the others' bucket.
"""
from __future__ import annotations

import torch

from ..collectives import TRACKER


def joinable(reducer) -> bool:
    """Whether a joined rank can take part in this reducer's exchange: not when sharded
    (each rank steps its part) or with PowerSGD (per-rank error feedback)."""
    return reducer.sharded is None and reducer.powersgd is None


def zero_exchange(reducer) -> None:
    """Collective over the reducer's communicator, in the engine thread of a joined rank
    (its communication thread is idle: this rank runs no steps)."""
    from mpi4py import MPI

    try:
        for b in reducer.buckets:
            TRACKER.enter("bucket allreduce (joined: zeros)", 0, "gradients")
            if b.wire is None:
                buf, op = torch.zeros(len(b.flat), dtype=b.flat.dtype).numpy(), MPI.SUM
            elif b.wire_16bit:
                wire = torch.zeros(len(b.flat), dtype=b.wire.dtype)
                buf, op = [wire.view(torch.int16).numpy(), MPI.INT16_T], reducer._wire_op
            else:
                buf, op = torch.zeros(len(b.flat), dtype=b.wire.dtype).numpy(), MPI.SUM
            if reducer.overlap == "nonblocking":
                reducer.comm.Iallreduce(MPI.IN_PLACE, buf, op=op).Wait()
            else:
                reducer.algorithm.allreduce_(buf, op)
    finally:
        TRACKER.leave("gradients")
