"""Resume at another world size with the same math: the resume plan. Pure, no I/O, no MPI.

A run's identity includes its global batch G = ranks x --batch-size (run.json). When a
checkpoint written by W ranks is continued by W' ranks (a node lost, a requeued job given
more or fewer nodes), `resume_plan` keeps G: each rank takes G / W' samples per step and
splits them into as many micro-batches (--accum-steps) as keep a micro-batch no larger
than the flags' own (--batch-size / --accum-steps), so a rank's memory use stays what it
was. Steps per epoch (samples // G), the learning-rate schedule (it follows the global
step and G) and the optimizer state carry over unchanged.

Position in the epoch: the checkpoint's step within its epoch, which is the number of
global batches taken, whatever the world size: `sample_in_epoch` = step x G. With shuffle
off, global batch k is samples [k*G, (k+1)*G) at any world size (data/sharding.py), so the
continued run takes exactly the batches the uninterrupted one would have, split over other
ranks. With shuffle on, the rest of the interrupted epoch keeps the checkpoint's layout
(sharding.handover_segments: the same global batches, regrouped over the new ranks); later
epochs use the new world size's own shuffled layout.

An epoch's metrics are sums over its steps kept per rank (the checkpoint holds each rank's
partial sums); `redistribute_partial` hands W ranks' partial sums to W' ranks so that the
epoch's means come out as if no rank count had changed.

What differs from an uninterrupted run: the order of additions in the gradient mean (float
rounding), and per-rank random streams (dropout, augmentation), which are drawn per rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UsageError
from .wording import plural


@dataclass(frozen=True)
class ResumePlan:
    """How this start continues a checkpoint: its layout and where in the epoch it goes on."""
    world_size: int          # this start's ranks
    batch_size: int          # samples per rank per step, this start (G / world_size)
    accum_steps: int         # micro-batches per step, this start
    from_world_size: int     # the checkpoint's ranks
    global_batch: int        # G, the same before and after
    epoch: int               # the checkpoint's epoch (0-based) and step within it
    step_in_epoch: int

    @property
    def resized(self) -> bool:
        return self.world_size != self.from_world_size

    @property
    def from_batch_size(self) -> int:
        return self.global_batch // self.from_world_size

    @property
    def sample_in_epoch(self) -> int:
        """Samples of the epoch taken before the checkpoint, at any world size."""
        return self.step_in_epoch * self.global_batch

    def describe(self) -> str:
        """The start-up line's account of a change of world size."""
        return (f"{plural(self.world_size, 'rank')} continue{'s' if self.world_size == 1 else ''} "
                f"the checkpoint of "
                f"{plural(self.from_world_size, 'rank')}: global batch {self.global_batch} kept "
                f"as {self.world_size} x --batch-size {self.batch_size} with --accum-steps "
                f"{self.accum_steps} (was {self.from_world_size} x {self.from_batch_size}); "
                f"epoch {self.epoch + 1} goes on at sample {self.sample_in_epoch} "
                f"(step {self.step_in_epoch})")


def resume_plan(global_batch: int, from_world_size: int, world_size: int, batch_size: int,
                accum_steps: int, epoch: int = 0, step_in_epoch: int = 0) -> ResumePlan:
    """The plan for `world_size` ranks, started with `--batch-size batch_size --accum-steps
    accum_steps`, to continue a checkpoint of `from_world_size` ranks and global batch
    `global_batch` at (`epoch`, `step_in_epoch`). Flags that already give the global batch
    at this world size are kept as given. UsageError where the global batch cannot be kept
    (it is not a multiple of the new rank count): a phrase saying so, which rundir puts
    into its one line."""
    for name, value in (("global_batch", global_batch), ("from_world_size", from_world_size),
                        ("world_size", world_size), ("batch_size", batch_size),
                        ("accum_steps", accum_steps)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if batch_size * world_size == global_batch:
        batch, accum = batch_size, accum_steps
    elif global_batch % world_size:
        raise UsageError(
            f"its global batch {global_batch} ({from_world_size} x "
            f"{global_batch // from_world_size}) cannot be kept on "
            f"{plural(world_size, 'rank')}: {global_batch} is not a multiple of {world_size}; "
            f"continue it on {_rank_counts(global_batch)} ranks")
    else:
        batch = global_batch // world_size
        micro = math.ceil(batch_size / accum_steps)  # the flags' micro-batch: memory per pass
        accum = min(batch, math.ceil(batch / micro))
    return ResumePlan(world_size, batch, accum, from_world_size, global_batch, epoch,
                      step_in_epoch)


def _rank_counts(global_batch: int, most: int = 8) -> str:
    """The rank counts that can keep `global_batch`, e.g. '1, 2, 3, 4, 6, 8, 12 or 16'."""
    found = [d for d in range(1, global_batch + 1) if global_batch % d == 0]
    shown = found[:most]
    text = ", ".join(map(str, shown[:-1])) + f" or {shown[-1]}" if len(shown) > 1 else str(shown[0])
    return text + (", ..." if len(found) > most else "")


def redistribute_partial(partials: list, world_size: int) -> list:
    """Partial epoch sums of W ranks (each [loss sum, flat statistic sums], as checkpoints
    hold them) for `world_size` ranks, such that the epoch's means come out as if nothing had
    changed. The epoch's train loss is the mean over ranks of each rank's sum of per-step
    batch means (equal batches), so each new rank takes the old ranks' mean loss sum; the
    statistics are sums over samples, divided by all ranks' samples, so each new rank takes
    1/world_size of their total. Unchanged at the same world size."""
    if len(partials) == world_size:
        return list(partials)
    old = len(partials)
    loss = sum(float(p[0]) for p in partials) / old
    flats = [list(p[1]) if isinstance(p[1], (list, tuple)) else [p[1]] for p in partials]
    total = [sum(float(f[i]) for f in flats) for i in range(len(flats[0]))]
    return [[loss, [t / world_size for t in total]] for _ in range(world_size)]


def lost_steps(progress: dict | None, checkpoint_step: int, run_id: str) -> int:
    """Steps the run took after its newest checkpoint before it ended, which a resume from
    that checkpoint takes again: OUT/progress.json's last step (rank 0 writes it at most
    once a second, so up to a second of steps may go uncounted) minus the checkpoint's.
    0 when the progress is another run's, or older than the checkpoint."""
    if not progress or progress.get("run_id") != run_id:
        return 0
    return max(0, int(progress.get("step", 0)) - int(checkpoint_step))
