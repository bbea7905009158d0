"""Devices and numeric precision per rank.

One rank per GPU: rank r of a node uses cuda:(local rank), so a node's ranks never share a
GPU. Where CUDA is missing, ranks compute on CPU threads (env.py sizes them).
Mixed precision: autocast to bf16 (CPU or CUDA) or fp16 (CUDA, with dynamic loss scaling:
fp16's narrow exponent range would flush small gradients to zero without it).
"""
from __future__ import annotations

import contextlib

import torch

from .errors import UsageError


def resolve(choice: str, local_rank: int, local_size: int, cuda_count: int | None = None) -> torch.device:
    """The device this rank computes on. Pure given cuda_count (None: ask torch)."""
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if choice == "cpu" or (choice == "auto" and cuda_count == 0):
        return torch.device("cpu")
    if cuda_count == 0:
        raise UsageError("--device cuda: no CUDA device is visible to this rank (CUDA_VISIBLE_"
                         "DEVICES, driver, or a CPU-only torch build); use --device cpu")
    if cuda_count == 1:
        return torch.device("cuda", 0)  # the launcher gave each rank its own GPU (srun --gpus-per-task)
    if local_size > cuda_count:
        raise UsageError(f"--device cuda: {local_size} ranks on this node but {cuda_count} GPUs; "
                         f"start one rank per GPU")
    return torch.device("cuda", local_rank)


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs CUDA (loss-scaled fp16 is a GPU technique); "
                         "on CPU use --precision bf16")


def autocast(precision: str, device: torch.device):
    """Context for the forward pass and loss: autocast to 16 bits, or nothing for fp32.
    Weights, gradients and optimizer state stay fp32, so the allreduce is unchanged."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device):
    """fp16 only: dynamic loss scaling. Its inf/NaN check runs on the averaged gradients,
    which are identical on every rank, so every rank skips or takes the same steps."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
