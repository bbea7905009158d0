"""Data augmentation for image batches, per rank and deterministic from the seed.

Every rank draws from its own generator seeded by (seed, epoch, rank, step), so a run is
reproducible, a resumed run draws exactly what the uninterrupted run drew, and ranks do not
apply the same transformations to their different samples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def generator(seed: int, epoch: int, rank: int, step: int) -> torch.Generator:
    g = torch.Generator()
    # mix the four integers into one 63-bit seed (distinct tuples -> distinct streams)
    mixed = ((((seed * 1_000_003 + epoch) * 1_000_033 + rank) * 1_000_037 + step)) % (2**63 - 1)
    return g.manual_seed(mixed)


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (zero padding), like a padded crop."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (n, w)
    idx_n = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    out = x.clone()
    out[flip] = x[flip].flip(-1)
    return out


def check_targets(kind: str, sample_shape, target_shape) -> None:
    """UsageError where --augment would move x's pixels but not y's: targets per pixel (a
    segmentation's labels, a field to regress) shaped like the images' height and width."""
    from .errors import UsageError

    sample_shape, target_shape = tuple(sample_shape), tuple(target_shape)
    if kind != "none" and len(sample_shape) == 3 and target_shape[-2:] == sample_shape[1:]:
        raise UsageError(f"--augment {kind}: would shift or flip the samples' pixels but not "
                         f"their targets, which are per pixel ({target_shape}); augment before "
                         f"packing, or --augment none")


def augment(x: torch.Tensor, kind: str, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    if kind == "none" or x.ndim != 4:
        return x
    if "shift" in kind:
        x = random_shift(x, max_shift, g)
    if "flip" in kind:
        x = random_flip(x, g)
    return x
