"""The training loop: read a batch, forward, backward (gradients averaged as they are
produced), step; per epoch, average metrics across ranks and evaluate.

It knows the Reducer interface only, never the backend. Cross-rank invariant: every rank
runs the same number of steps per epoch (the reader guarantees it), so collectives in the
loop always match.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .data import eval_batches


def make_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model, ds, reducer, world, batch: int) -> tuple[float, float]:
    """(loss, accuracy) over the whole evaluation set; each rank scores its own part."""
    model.eval()
    loss_sum = correct = 0.0
    count = 0
    for x, y in eval_batches(ds, world.rank, world.size, batch):
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += len(y)
    loss_sum, correct, count = reducer.allreduce_array([loss_sum, correct, count])
    return loss_sum / count, correct / count


class Trainer:
    def __init__(self, cfg, world, reducer, model, optimizer, reader, test_ds, log, progress):
        self.cfg, self.world, self.reducer = cfg, world, reducer
        self.model, self.optimizer, self.reader = model, optimizer, reader
        self.test_ds, self.log, self.progress = test_ds, log, progress
        self.step = 0
        self.timers = {"compute": 0.0, "comm_wait": 0.0}

    def train_step(self, x, y) -> tuple[float, int]:
        t0 = time.perf_counter()
        self.reducer.zero_grad()
        out = self.model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()  # bucket allreduces start inside, as gradients become ready
        t1 = time.perf_counter()
        self.reducer.synchronize()  # exposed communication: what backward did not hide
        t2 = time.perf_counter()
        self.reducer.step()
        self.timers["compute"] += (t1 - t0) + (time.perf_counter() - t2)
        self.timers["comm_wait"] += t2 - t1
        self.step += 1
        return loss.item(), int((out.argmax(1) == y).sum())

    def fit(self) -> dict:
        cfg, world = self.cfg, self.world
        train_seconds, final = 0.0, {}
        for epoch in range(cfg.epochs):
            self.model.train()
            t0 = time.perf_counter()
            loss_sum = correct = 0.0
            bar = self.progress(total=self.reader.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}")
            for x, y in self.reader.epoch(epoch):
                loss, right = self.train_step(x, y)
                loss_sum += loss
                correct += right
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.close()
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            steps = self.reader.steps
            # every rank ran `steps` steps of equal batches, so the plain mean is exact
            train_loss, train_acc = self.reducer.mean(loss_sum / steps, correct / (steps * cfg.batch_size))
            record = {"epoch": epoch + 1, "step": self.step, "train_loss": train_loss,
                      "train_accuracy": train_acc, "epoch_seconds": seconds,
                      "samples_per_second": steps * cfg.batch_size * world.size / seconds}
            if self.test_ds is not None:
                record["test_loss"], record["test_accuracy"] = evaluate(
                    self.model, self.test_ds, self.reducer, world, max(cfg.batch_size, 256))
            self.log.metrics(record)
            self.log.info(f"epoch {epoch + 1}/{cfg.epochs}  train loss {train_loss:.4f}  "
                          f"train acc {train_acc:.4f}" + (f"  test acc {record['test_accuracy']:.4f}"
                          if "test_accuracy" in record else "") +
                          f"  {record['samples_per_second']:.0f} samples/s")
            final = record
        samples = self.step * cfg.batch_size * world.size
        compute, comm, wait = (self.reducer.allreduce_array(
            [self.timers["compute"], self.timers["comm_wait"], self.reader.wait_seconds], "max"))
        return {
            "steps": self.step,
            "final_train_loss": final.get("train_loss"),
            "final_train_accuracy": final.get("train_accuracy"),
            "test_loss": final.get("test_loss"),
            "test_accuracy": final.get("test_accuracy"),
            "samples_per_second": samples / train_seconds if train_seconds else 0.0,
            "train_seconds": train_seconds,
            "breakdown_seconds_max_over_ranks": {"compute": compute, "comm_wait": comm,
                                                 "data_wait": wait},
        }
