"""The training loop: read a batch, forward, backward (gradients averaged as they are
produced), step; per epoch, average metrics across ranks and evaluate.

It knows the Reducer interface only, never the backend, and the Task interface only, never
a loss or metric (tasks.py); everything else ranks exchange (votes, metric means,
checkpoint gathers) goes through the control plane. Cross-rank invariant: every rank runs
the same number of steps per epoch (the reader guarantees it), so collectives in the loop
always match.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import device as devices
from . import optim, tasks
from .augment import augment, generator
from .buffers import RankBuffers
from .data import COUNTERS, eval_batches
from .errors import Diverged
from .metrics import NullProgress, NullRunLog
from .signals import StopRequest
from .timeline import NullTimeline
from .watchdog import Watchdog


@dataclass
class LoopHooks:
    """What the loop reports to and listens to. Each defaults to one that does nothing, so a
    test or benchmark that only wants steps passes none of them."""

    log: object = field(default_factory=NullRunLog)
    """metrics.jsonl, info lines (RunLog on rank 0, NullRunLog elsewhere)."""
    progress: object = NullProgress
    """progress(total=, initial=, desc=) -> a bar with set_postfix/update/close."""
    stop: StopRequest = field(default_factory=lambda: StopRequest(signals=()))
    """SIGUSR1/SIGTERM requests, voted on by all ranks each step."""
    watchdog: Watchdog = field(default_factory=lambda: Watchdog(0, 0, abort=None))
    """fed after every step; timeout 0 watches nothing."""
    timeline: object = field(default_factory=NullTimeline)
    """--timeline spans; the same object the reader and the reducer record in."""
    mark: object = lambda step, epoch: None
    """called after every step: rank 0 records where the run is (runrecord.ProgressMark), so
    a restart can count the steps it takes again."""


@torch.no_grad()
def evaluate(model, ds, control, batch: int, device=None, precision: str = "fp32",
             task=None) -> dict:
    """{"loss": ..., the task's metrics} over the whole evaluation set; each rank scores its
    own part, and the sums and the sample count are reduced before any ratio is taken."""
    model.eval()
    device = device or torch.device("cpu")
    task = task or tasks.Classify(ds.classes)
    loss_sum, count = 0.0, 0
    totals = task.zero_sums(device)
    for x, y in eval_batches(ds, control.rank, control.size, batch):
        x, y = x.to(device), y.to(device)
        with devices.autocast(precision, device):
            out = model(x).float()
        loss_sum += task.test_loss_sum(out, y).item()
        for name, value in task.sums(out, y).items():
            totals[name] += value
        count += len(y)
    reduced = control.allreduce(np.concatenate([[loss_sum], tasks.flatten(totals), [count]]))
    count = reduced[-1]
    return {"loss": float(reduced[0] / count),
            **task.metrics(tasks.unflatten(reduced[1:-1] / count, totals))}


class Trainer:
    def __init__(self, cfg, control, reducer, model, optimizer, reader, test_ds=None,
                 hooks: LoopHooks | None = None, task: tasks.Task | None = None):
        """control: the job's ControlPlane; reducer: already attached to model/optimizer;
        reader: this rank's RankReader; test_ds: evaluated after each epoch (None: not);
        task: the loss and metrics (default: classify with --label-smoothing)."""
        self.cfg, self.control, self.reducer = cfg, control, reducer
        self.model, self.optimizer, self.reader = model, optimizer, reader
        self.test_ds = test_ds
        self.task = task or tasks.Classify(getattr(getattr(reader, "ds", None), "classes", 2),
                                           cfg.label_smoothing)
        hooks = hooks or LoopHooks()
        self.log, self.progress, self.stop = hooks.log, hooks.progress, hooks.stop
        self.watchdog, self.timeline, self.mark = hooks.watchdog, hooks.timeline, hooks.mark
        self.step = 0
        self.last_checkpoint = time.monotonic()  # --checkpoint-every-seconds counts from here
        self.checkpoint_due = False  # agreed by every rank in the per-step vote
        self.skipped_steps = 0
        self.device = next(model.parameters()).device
        self.scaler = devices.grad_scaler(cfg.precision, self.device)
        self.schedule = optim.LRSchedule(cfg, control.size, reader.steps)
        self.trainable = [p for g in optimizer.param_groups for p in g["params"]]
        self.timers = {"compute": 0.0, "comm_wait": 0.0}
        self.zero = self.task.zero_sums(self.device)  # the shapes of the task's statistics
        # BatchNorm statistics: each rank's own while training, agreed before evaluating
        # and saving (buffers.py), so what is reported is what is saved
        self.buffers = RankBuffers(model, control)

    def train_step(self, x, y, epoch: int = 0) -> tuple[float, dict] | None:
        """One optimizer step: (loss, the task's sums over the batch); None if it was
        skipped (non-finite loss, --nonfinite skip)."""
        t0 = time.perf_counter()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.cfg.augment != "none":  # this rank's own stream, fixed by (seed, epoch, rank, step)
            x = augment(x, self.cfg.augment,
                        generator(self.cfg.seed, epoch, self.control.rank, self.step))
        self.reducer.zero_grad()
        loss, sums = self.forward_backward(x, y)  # allreduces start in the last backward
        self.buffers.trained()  # this rank's running statistics moved with its own samples
        t1 = time.perf_counter()
        self.reducer.synchronize()  # exposed communication: what backward did not hide
        t2 = time.perf_counter()
        loss_value = loss.item()
        # One tiny collective per step carries every cross-rank decision: did any rank get a
        # stop signal, did any rank see a non-finite loss, is a timed checkpoint due on any
        # rank's clock? All ranks act on the same answer, at the same step.
        signal_flag, nonfinite, due = self.control.allreduce(
            [self.stop.local_flag(), 0.0 if math.isfinite(loss_value) else 1.0,
             1.0 if self._timed_checkpoint_due() else 0.0], "max")
        self.step += 1
        self.stop.agreed(signal_flag)
        self.checkpoint_due = bool(due)
        if nonfinite:
            if self.cfg.nonfinite == "stop":
                raise Diverged(f"non-finite loss at step {self.step} (on at least one rank); "
                               f"lower --lr, or pass --nonfinite skip to skip such steps")
            self.skipped_steps += 1
            return None
        self.apply_update()
        t3 = time.perf_counter()
        self.timers["compute"] += (t1 - t0) + (t3 - t2)
        self.timers["comm_wait"] += t2 - t1
        self.timeline.add("forward_backward", t0, t1, step=self.step)
        self.timeline.add("allreduce_wait", t1, t2, step=self.step)
        self.timeline.add("optimizer_step", t2, t3, step=self.step)
        return loss_value, sums

    def _timed_checkpoint_due(self) -> bool:
        """This rank's vote: --checkpoint-every-seconds have passed since the last checkpoint."""
        every = self.cfg.checkpoint_every_seconds
        return bool(every) and time.monotonic() - self.last_checkpoint >= every

    def apply_update(self) -> None:
        """Clip, set the lr, step. The gradients are already averaged, hence identical on
        every rank: clipping and the loss scaler's inf check decide the same everywhere."""
        if self.reducer.sharded is not None:
            # each rank steps its part; the clipping norm is summed across the parts, the
            # updated parameters travel under the next forward (comm/sharding.py)
            if self.cfg.clip_grad_norm:
                self.reducer.clip_grad_norm_(self.cfg.clip_grad_norm)
            optim.set_lr(self.optimizer, self.schedule.lr(self.step - 1))
            self.reducer.step()
            return
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad_norm:
            optim.clip_grad_norm_([p.grad for p in self.trainable], self.cfg.clip_grad_norm)
        optim.set_lr(self.optimizer, self.schedule.lr(self.step - 1))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def forward_backward(self, x, y) -> tuple[torch.Tensor, dict]:
        """Gradient of the batch's mean loss in --accum-steps micro-batches: all but the last
        backward accumulate locally (no_sync), the last one starts the allreduces. Each
        micro-batch's mean loss is weighted by its share of the batch, so the sum of their
        gradients is the gradient of one pass over the batch. Returns (loss, the task's
        sums over the batch)."""
        k = self.cfg.accum_steps
        micro = list(zip(x.tensor_split(k), y.tensor_split(k)))
        loss_sum, sums = 0.0, {}
        for i, (xm, ym) in enumerate(micro):
            final = i == len(micro) - 1
            with contextlib.nullcontext() if final else self.reducer.no_sync():
                with devices.autocast(self.cfg.precision, self.device):
                    out = self.model(xm)
                    loss = self.task.loss(out.float(), ym)
                loss = loss * (len(ym) / len(y))
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            loss_sum = loss_sum + loss.detach()
            for name, value in self.task.sums(out.detach().float(), ym).items():
                sums[name] = sums[name] + value if name in sums else value
        return loss_sum, sums

    def fit(self, resumed: dict | None = None) -> dict:
        """Train from the start, or from a checkpoint's position. Returns the run's results;
        results["stopped_by"] names the signal if the run stopped early (after checkpointing)."""
        start_epoch, start_step, last = 0, 0, {}
        partial = self.fresh_sums()
        if resumed is not None:
            start_epoch, start_step = resumed["epoch"], resumed["step_in_epoch"]
            self.step, last = resumed["global_step"], resumed.get("last_record", {})
            if len(resumed["partial"]) == self.control.size:
                partial = self.restored_sums(resumed["partial"][self.control.rank])
        train_seconds = 0.0
        for epoch in range(start_epoch, self.cfg.epochs):
            first = start_step if epoch == start_epoch else 0
            sums = partial if epoch == start_epoch else self.fresh_sums()
            skipped_before = self.skipped_steps
            t0 = time.perf_counter()
            outcome = self.train_epoch(epoch, first, sums, last)
            if isinstance(outcome, dict):  # stopped by an agreed signal, position saved
                return outcome
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            last = self.end_epoch(epoch, first, outcome, self.skipped_steps - skipped_before,
                                  seconds)
        return self._results(last, train_seconds, self.step - (resumed or {}).get("global_step", 0))

    def fresh_sums(self) -> tuple[float, dict]:
        """(loss sum, the task's sums), zero: what an epoch starts adding to."""
        return 0.0, {name: zero.clone() for name, zero in self.zero.items()}

    def restored_sums(self, saved) -> tuple[float, dict]:
        """A checkpoint's partial epoch sums of this rank (flattened by `checkpoint`). A
        checkpoint from before tasks holds (loss sum, correct) of a classifier."""
        loss_sum, flat = saved
        if np.ndim(flat) == 0:
            flat = [flat]
        values = tasks.unflatten(np.asarray(flat, dtype=np.float64), self.zero)
        return float(loss_sum), {name: torch.as_tensor(v, device=self.device)
                                 for name, v in values.items()}

    def train_epoch(self, epoch: int, first: int, sums, last: dict):
        """Steps [first, steps) of `epoch`. Returns this rank's (loss sum, the task's sums)
        over the steps taken, or, if the ranks agreed to stop, the stopped run's results
        (a dict) after checkpointing the position."""
        self.model.train()
        loss_sum, totals = sums
        bar = self.progress(total=self.reader.steps, initial=first,
                            desc=f"epoch {epoch + 1}/{self.cfg.epochs}")
        for done, (x, y) in enumerate(self.reader.epoch(epoch, first), start=first + 1):
            result = self.train_step(x, y, epoch)
            self.watchdog.beat(self.step)
            self.mark(self.step, epoch)
            if result is not None:
                loss_sum += result[0]
                for name, value in result[1].items():
                    totals[name] += value  # float64: exact for counts, and resumable bit for bit
                bar.set_postfix(loss=f"{result[0]:.4f}", refresh=False)
            bar.update(1)
            if self.stop.stopping is not None:  # agreed by all ranks inside train_step
                bar.close()
                self.watchdog.beat(self.step, "checkpoint")
                # nobody exits before rank 0's file is complete (the save waits for it)
                path = self.checkpoint(epoch, done, (loss_sum, totals), last)
                return {"stopped_by": self.stop.name, "checkpoint": path, "steps": self.step}
            every = self.cfg.checkpoint_every
            if ((every and self.step % every == 0) or self.checkpoint_due) and done < self.reader.steps:
                self.checkpoint(epoch, done, (loss_sum, totals), last)
        bar.close()
        return loss_sum, totals

    def end_epoch(self, epoch: int, first: int, sums, skipped: int, seconds: float) -> dict:
        """Collective: average the epoch's metrics over ranks, evaluate, log, checkpoint.
        Returns the epoch's metrics record."""
        cfg, steps = self.cfg, self.reader.steps
        loss_sum, totals = sums
        # Every rank ran `steps` steps of equal batches (skipped steps were agreed: the same
        # on every rank), so the mean over ranks of each rank's mean per sample is the mean
        # over all samples; the task's ratios are taken from those means only.
        taken = max(1, steps - skipped)
        means = self.control.allreduce(np.concatenate(
            [[loss_sum / taken], tasks.flatten(totals) / (taken * cfg.batch_size)])) / self.control.size
        metrics = self.task.metrics(tasks.unflatten(means[1:], self.zero))
        last = {"epoch": epoch + 1, "step": self.step, "train_loss": float(means[0]),
                **{f"train_{name}": value for name, value in metrics.items()},
                "epoch_seconds": seconds,
                "samples_per_second": (steps - first) * cfg.batch_size * self.control.size / seconds}
        self.reducer.wait_parameters()
        # at every epoch's end (not only with a test set): the evaluated model, the
        # checkpoint below and model.pt are one, and a resumed run agrees at the same steps
        self.buffers.agree()
        if self.test_ds is not None:
            self.watchdog.beat(self.step, "evaluation")
            with self.timeline.span("evaluate", epoch=epoch + 1):
                tested = evaluate(self.model, self.test_ds, self.control,
                                  max(cfg.batch_size, 256), self.device, cfg.precision, self.task)
            last.update({f"test_{name}": value for name, value in tested.items()})
        self.log.metrics(last)
        self.log.info("  ".join([f"epoch {epoch + 1}/{cfg.epochs}", f"train loss {means[0]:.4f}",
                                 *headline(self.task, last),
                                 f"{last['samples_per_second']:.0f} samples/s"]))
        self.watchdog.beat(self.step, "checkpoint")
        with self.timeline.span("checkpoint"):
            self.checkpoint(epoch + 1, 0, self.fresh_sums(), last)
        self.timeline.flush()  # collective, once per epoch on every rank
        self.watchdog.beat(self.step)
        return last

    def checkpoint(self, epoch: int, step_in_epoch: int, partial, last: dict) -> str | None:
        """Collective (checkpoint.save_collectively): the model with the agreed buffers,
        every rank's RNG state, partial epoch sums, reducer state (PowerSGD's residuals
        differ per rank) and, mid-epoch, its own buffers; rank 0 writes while the others
        wait idly. The path on rank 0, else None."""
        from . import checkpoint

        loss_sum, totals = partial
        self.last_checkpoint = time.monotonic()  # on every rank: the save is collective
        # sharded: the optimizer state gathered, saved unsharded
        with self.reducer.full_optimizer_state(), self.buffers.saving() as own_buffers:
            return checkpoint.save_collectively(
                self.control, self.cfg.out, self.cfg.keep_checkpoints, self.model,
                self.optimizer, epoch, step_in_epoch, self.step,
                per_rank={"partial": [loss_sum, tasks.flatten(totals).tolist()],
                          "reducer": self.reducer.state_dict(), "buffers": own_buffers},
                extra={"last_record": last, **checkpoint.task_fields(self.task)})

    def _results(self, last: dict, train_seconds: float, steps_run: int) -> dict:
        samples = steps_run * self.cfg.batch_size * self.control.size
        compute, comm, wait = (self.control.allreduce(
            [self.timers["compute"], self.timers["comm_wait"], self.reader.wait_seconds], "max"))
        compute, comm, wait = float(compute), float(comm), float(wait)
        io = COUNTERS.snapshot()  # this rank's whole run: start-up, scan, epochs, evaluation
        io_max = self.control.allreduce([io["files_opened"], io["bytes_read"]], "max")
        io_min = self.control.allreduce([io["files_opened"], io["bytes_read"]], "min")
        # the task's metrics of the last epoch; accuracy's keys always (None where none)
        final = {("final_" if k.startswith("train_") else "") + k: v for k, v in last.items()
                 if k.startswith(("train_", "test_"))}
        return {
            "steps": self.step,
            "skipped_steps": self.skipped_steps,
            "final_train_loss": last.get("train_loss"),
            "final_train_accuracy": last.get("train_accuracy"),
            "test_loss": last.get("test_loss"),
            "test_accuracy": last.get("test_accuracy"),
            **final,
            "samples_per_second": samples / train_seconds if train_seconds else 0.0,
            "train_seconds": train_seconds,
            "breakdown_seconds_max_over_ranks": {"compute": compute, "comm_wait": comm,
                                                 "data_wait": wait},
            "data_io_per_rank": {"files_opened_max": int(io_max[0]), "files_opened_min": int(io_min[0]),
                                 "bytes_read_max": int(io_max[1]), "bytes_read_min": int(io_min[1])},
        }


def headline(task, record: dict) -> list[str]:
    """The per-epoch line's metrics: the task's headline ones, train and (if evaluated) test,
    e.g. ["train acc 0.9812", "test acc 0.9750"]."""
    parts = []
    for prefix in ("train", "test"):
        for name, label in task.headline:
            value = record.get(f"{prefix}_{name}", [])
            if not isinstance(value, list):  # lists (per output) are for the files only
                parts.append(f"{prefix} {label} " + ("n/a" if value is None else f"{value:.4f}"))
    return parts
