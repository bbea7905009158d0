"""Gradient compression, Horovod's interface: a compressor has compress(tensor) ->
(tensor, ctx) and decompress(tensor, ctx) -> tensor.

Compression.none and Compression.fp16 are Horovod's. hpcaccel adds (extensions):
  Compression.bf16          bfloat16 on the wire: float32's range, so no loss scaling is
                            needed where fp16 would overflow.
  Compression.powersgd(r)   low-rank PowerSGD with error feedback (DistributedOptimizer
                            only: it compresses whole gradient matrices across steps).
In DistributedOptimizer the built-in compressors are applied per bucket by hpcaccel's
reducer (the 16-bit copy is made as a bucket goes on the wire, summed in 16 bits); in
allreduce(compression=...) per tensor, as Horovod does.
"""
from __future__ import annotations

import torch


class Compressor:
    """Interface; `wire` names the reducer's compression for DistributedOptimizer."""

    wire = None

    @staticmethod
    def compress(tensor):
        raise NotImplementedError

    @staticmethod
    def decompress(tensor, ctx):
        raise NotImplementedError


class NoneCompressor(Compressor):
    wire = "none"

    @staticmethod
    def compress(tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


class _Cast16(Compressor):
    dtype = None

    @classmethod
    def compress(cls, tensor):
        if tensor.dtype.is_floating_point and tensor.dtype != cls.dtype:
            return tensor.type(cls.dtype), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor if ctx is None else tensor.type(ctx)


class FP16Compressor(_Cast16):
    """Floating tensors travel as float16 and come back in their own dtype."""
    wire, dtype = "fp16", torch.float16


class BF16Compressor(_Cast16):
    """Floating tensors travel as bfloat16 and come back in their own dtype (extension)."""
    wire, dtype = "bf16", torch.bfloat16


class PowerSGDCompressor(Compressor):
    """Rank-`rank` PowerSGD of gradient matrices with error feedback, after `start_step`
    exact steps (extension; DistributedOptimizer only)."""

    wire = "powersgd"

    def __init__(self, rank: int = 4, start_step: int = 0):
        if int(rank) < 1 or int(start_step) < 0:
            raise ValueError(f"Compression.powersgd(rank={rank}, start_step={start_step}): "
                             f"rank must be >= 1 and start_step >= 0")
        self.rank, self.start_step = int(rank), int(start_step)

    def compress(self, tensor):
        raise ValueError("Compression.powersgd compresses gradients across steps: pass it to "
                         "DistributedOptimizer(compression=...), not to allreduce()")

    decompress = compress

    def __repr__(self):
        return f"Compression.powersgd(rank={self.rank}, start_step={self.start_step})"


class Compression:
    """Horovod's compression choices, plus hpcaccel's bf16 and powersgd (extensions)."""

    none = NoneCompressor
    fp16 = FP16Compressor
    bf16 = BF16Compressor
    powersgd = PowerSGDCompressor
