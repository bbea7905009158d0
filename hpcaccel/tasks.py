"""Tasks: what is learned from y. A task is the loss, the metrics and the output shape the
model must produce; the Trainer is handed one, as it is handed the reducer, and never names
a loss or a metric itself.

  classify  y: one integer class label per sample. The model outputs (classes,) logits;
            cross-entropy with --label-smoothing; accuracy.
  regress   y: float targets of any shape. The model outputs y's shape ((1,) for one number
            per sample); --loss mse|l1|huber; rmse, mae and r2, over all outputs and per
            output.
  segment   y: an integer class label per element, shaped (N, *shape) (a class per pixel).
            The model outputs (classes, *shape) logits; per-element cross-entropy;
            pixel_accuracy and mean_iou.
  auto      chosen from y: integer labels of one per sample -> classify, float targets ->
            regress, integer labels per element -> segment.
  package.module:factory   your own: factory(target) returns (loss, metrics) or (loss,
            metrics, output_shape), or a Task (see `from_factory`, docs/training.md).

Metrics across ranks: `sums(out, y)` returns sums over a batch of per-sample statistics;
the loop adds them over batches and ranks and divides by the number of samples, so
`metrics(means)` sees each statistic's mean per sample over the whole data (the same on
every rank) and takes ratios and roots (accuracy, RMSE, R^2, IoU) only then, never as an
average of per-rank ratios.
"""
from __future__ import annotations

import importlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import LOSSES as _LOSS_FLAGS, TASKS
from .data import Target
from .errors import UsageError

BUILTIN = TASKS[1:]  # classify, regress, segment
LOSSES = _LOSS_FLAGS[1:]  # mse, l1, huber
PER_OUTPUT_MAX = 64  # per-output (per-class) lists are recorded up to this many outputs


class Task:
    """The interface the loop uses. Subclasses set `name`, `output_shape` and `headline`,
    and implement `loss`, `sums` and `metrics`."""

    name = "task"
    output_shape: tuple = ()
    headline: tuple = ()
    """(metric, label) pairs the per-epoch line and the final line show, e.g. ("r2", "r2")."""
    target: Target = Target()
    """What y holds (set by `resolve`)."""
    loss_name: str | None = None
    """The loss as --loss names it (cross-entropy for classify and segment); None for a
    factory's, which its task name identifies. A checkpoint records it: train_loss must not
    change meaning mid-run (checkpoint.Requirements)."""
    chosen_by_auto = False

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training objective: a scalar, the mean over the batch (autograd flows from it).
        `out` is the model's output in float32, `y` the batch's targets as read."""
        raise NotImplementedError

    def test_loss_sum(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Evaluation: the sum over the batch of each sample's loss (test_loss is its mean)."""
        return self.loss(out, y) * len(y)

    def sums(self, out: torch.Tensor, y: torch.Tensor) -> dict:
        """Sums over the batch of per-sample statistics (tensors of fixed shapes), added up
        over batches and ranks."""
        return {}

    def metrics(self, means: dict) -> dict:
        """The metrics from `means` (each statistic of `sums` as numpy float64, divided by
        the number of samples): names -> a float, a list, or None where undefined."""
        return {}

    def describe(self) -> str:
        """The start-up line's phrase."""
        return self.name

    def zero_sums(self, device=None) -> dict:
        """Zeros shaped like `sums`' statistics, float64: the start of every total, so a
        rank without a sample of its own still contributes a vector of the same length."""
        out = torch.zeros(1, *self.output_shape, device=device)
        y = torch.zeros(1, *self.target.shape, dtype=getattr(torch, self.target.dtype),
                        device=device)
        with torch.no_grad():
            return {k: torch.zeros_like(torch.as_tensor(v, device=device), dtype=torch.float64)
                    for k, v in self.sums(out, y).items()}


class Classify(Task):
    name = "classify"
    headline = (("accuracy", "acc"),)
    loss_name = "cross-entropy"

    def __init__(self, classes: int, label_smoothing: float = 0.0):
        self.classes, self.label_smoothing = int(classes), float(label_smoothing)
        self.output_shape = (self.classes,)

    def loss(self, out, y):
        return F.cross_entropy(out, y, label_smoothing=self.label_smoothing)

    def test_loss_sum(self, out, y):
        return F.cross_entropy(out, y, reduction="sum")  # without smoothing

    def sums(self, out, y):
        return {"correct": (out.argmax(1) == y).sum()}

    def metrics(self, means):
        return {"accuracy": float(means["correct"])}

    def describe(self):
        return f"classify ({self.classes} classes)"


class Regress(Task):
    name = "regress"
    headline = (("rmse", "rmse"), ("r2", "r2"))

    def __init__(self, target_shape=(), loss: str = "mse"):
        if loss not in LOSSES:
            raise UsageError(f"--loss {loss}: regress takes {', '.join(LOSSES)}")
        self.loss_name = loss
        self.output_shape = tuple(target_shape) or (1,)
        self.outputs = math.prod(self.output_shape)
        self._loss = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}[loss]

    def loss(self, out, y):
        return self._loss(out.reshape(y.shape), y.to(out.dtype))

    def sums(self, out, y):
        # float64: R^2 takes a variance from the sums of y and y^2
        target = y.reshape(len(y), -1).double()
        error = out.reshape(len(y), -1).double() - target
        return {"squared_error": (error * error).sum(0), "absolute_error": error.abs().sum(0),
                "target": target.sum(0), "target_squared": (target * target).sum(0)}

    def metrics(self, means):
        mse, mae = means["squared_error"], means["absolute_error"]
        variance = means["target_squared"] - means["target"] ** 2
        # a constant target has no R^2 (0/0); rounding can leave a tiny variance instead of 0
        defined = variance > 1e-12 * np.maximum(means["target_squared"], 1e-300)
        r2 = np.where(defined, 1.0 - mse / np.where(defined, variance, 1.0), np.nan)
        result = {"rmse": float(np.sqrt(mse.mean())), "mae": float(mae.mean()),
                  "r2": float(r2[defined].mean()) if defined.any() else None}
        if 1 < self.outputs <= PER_OUTPUT_MAX:
            result.update(rmse_per_output=_floats(np.sqrt(mse)), mae_per_output=_floats(mae),
                          r2_per_output=_floats(r2))
        return result

    def describe(self):
        return f"regress ({self.outputs} output{'s' if self.outputs != 1 else ''}, loss {self.loss_name})"


class Segment(Task):
    name = "segment"
    headline = (("pixel_accuracy", "pixel acc"), ("mean_iou", "miou"))
    loss_name = "cross-entropy"

    def __init__(self, classes: int, target_shape, label_smoothing: float = 0.0):
        self.classes, self.label_smoothing = int(classes), float(label_smoothing)
        self.output_shape = (self.classes, *target_shape)
        self.elements = math.prod(target_shape)

    def loss(self, out, y):
        return F.cross_entropy(out, y, label_smoothing=self.label_smoothing)

    def test_loss_sum(self, out, y):  # a sample's loss: the mean over its elements
        return F.cross_entropy(out, y, reduction="sum") / self.elements

    def sums(self, out, y):
        k = self.classes
        confusion = torch.bincount((y * k + out.argmax(1)).reshape(-1), minlength=k * k)
        confusion = confusion.reshape(k, k)  # [true, predicted]
        hits = confusion.diagonal()
        return {"correct": hits.sum(), "intersection": hits,
                "union": confusion.sum(0) + confusion.sum(1) - hits}

    def metrics(self, means):
        union, present = means["union"], means["union"] > 0  # classes seen or predicted
        iou = np.where(present, means["intersection"] / np.where(present, union, 1.0), np.nan)
        result = {"pixel_accuracy": float(means["correct"] / self.elements),
                  "mean_iou": float(iou[present].mean()) if present.any() else None}
        if self.classes <= PER_OUTPUT_MAX:
            result["iou_per_class"] = _floats(iou)
        return result

    def describe(self):
        return f"segment ({self.classes} classes, {self.elements} elements per sample)"


class Custom(Task):
    """A task from a factory's (loss, metrics[, output_shape]); each metric is reported as
    its sum over all samples divided by their number."""

    def __init__(self, name: str, loss, metrics: dict, output_shape):
        self.name, self._loss, self._metrics = name, loss, dict(metrics)
        self.output_shape = tuple(int(s) for s in output_shape)
        self.headline = tuple((k, k) for k in list(self._metrics)[:2])

    def loss(self, out, y):
        return self._loss(out, y)

    def sums(self, out, y):
        return {k: torch.as_tensor(fn(out, y), device=out.device) for k, fn in self._metrics.items()}

    def metrics(self, means):
        return {k: float(v) if np.ndim(v) == 0 else _floats(np.ravel(v)) for k, v in means.items()}


def _floats(values) -> list:
    return [None if not math.isfinite(v) else float(v) for v in np.asarray(values, dtype=float)]


# -- choosing a task ------------------------------------------------------------------------
def auto_choice(target: Target) -> str:
    """--task auto: integer labels of one per sample classify, float targets regress,
    integer labels per element segment."""
    if not target.integer:
        return "regress"
    return "segment" if target.shape else "classify"


def resolve(spec: str, target: Target, where: str, loss: str = "auto",
            label_smoothing: float = 0.0) -> Task:
    """The task --task `spec` names, checked against the training data's y (`target`;
    `where`: "--data PATH" for messages). UsageError, one line, where they do not fit."""
    name = auto_choice(target) if spec == "auto" else spec
    if ":" in name:
        task = from_factory(name, target)
    elif name not in BUILTIN:
        raise UsageError(f"--task: unknown task {name!r} (auto, {', '.join(BUILTIN)}, or "
                         f"package.module:factory)")
    else:
        _check_fit(name, target, where)
        task = _builtin(name, target, loss, label_smoothing)
    if ":" in name or name != "regress":
        if loss != "auto":
            raise UsageError(f"--loss {loss}: for --task regress only ({task.name} has its "
                             f"own loss)")
    if label_smoothing and name not in ("classify", "segment"):
        raise UsageError(f"--label-smoothing: for --task classify and segment only, not "
                         f"{task.name}")
    task.target, task.chosen_by_auto = target, spec == "auto"
    return task


def _builtin(name: str, target: Target, loss: str, label_smoothing: float) -> Task:
    if name == "classify":
        return Classify(target.classes, label_smoothing)
    if name == "segment":
        return Segment(target.classes, target.shape, label_smoothing)
    return Regress(target.shape, "mse" if loss == "auto" else loss)


def _check_fit(name: str, target: Target, where: str) -> None:
    holds = f"{where} holds {target.describe()}"
    if name == "classify" and (not target.integer or target.shape):
        fits = auto_choice(target)
        raise UsageError(f"--task classify needs one integer class label per sample, but "
                         f"{holds} (--task {fits} fits them)")
    if name == "segment" and (not target.integer or not target.shape):
        raise UsageError(f"--task segment needs an integer class label per element (y shaped "
                         f"(samples, ...)), but {holds} (--task {auto_choice(target)} fits them)")
    if name in ("classify", "segment") and target.classes < 2:
        raise UsageError(f"--task {name}: {holds}; it needs at least 2 classes")


def from_factory(spec: str, target: Target) -> Task:
    """--task package.module:factory. factory(target) returns one of
      (loss, metrics)                loss(out, y) -> the batch's mean loss (a scalar tensor);
      (loss, metrics, output_shape)  metrics: {name: fn(out, y) -> the sum over the batch
                                     (a tensor of any fixed shape)}; each metric is reported
                                     as its total over all samples and ranks / samples;
                                     output_shape: what the model must output per sample
                                     (default: y's shape per sample);
      a hpcaccel.tasks.Task          for metrics that are not means per sample (sums and
                                     metrics of your own)."""
    module_name, attr = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--task {spec}: cannot load factory ({e})") from None
    made = factory(target)
    if isinstance(made, Task):
        return made
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise UsageError(f"--task {spec}: the factory returned {type(made).__name__}; expected "
                         f"(loss, metrics), (loss, metrics, output_shape) or a hpcaccel.tasks.Task")
    loss, metrics = made[:2]
    output_shape = made[2] if len(made) == 3 else target.shape
    if not callable(loss):
        raise UsageError(f"--task {spec}: the loss is not callable")
    if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and k.isidentifier() and callable(f) for k, f in metrics.items()):
        raise UsageError(f"--task {spec}: metrics must be a dict of name -> function(out, y), "
                         f"names like test_mae's mae (letters, digits, _)")
    if "loss" in metrics:
        raise UsageError(f"--task {spec}: a metric may not be named 'loss' (train_loss and "
                         f"test_loss are the loss)")
    try:
        shape = tuple(int(s) for s in output_shape)
    except (TypeError, ValueError):
        raise UsageError(f"--task {spec}: output_shape must be a tuple of integers, got "
                         f"{output_shape!r}") from None
    if not shape:
        raise UsageError(f"--task {spec}: output_shape is empty (y holds one label per "
                         f"sample): return (loss, metrics, output_shape), e.g. (classes,)")
    return Custom(attr, loss, metrics, shape)


# -- a factory's task against a batch, before training ------------------------------------
def check_on_batch(task: Task, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                   spec: str) -> None:
    """--task `spec` (a factory's) on the first batch of --data, before training: its loss
    must run on the model's output and y and be a scalar autograd flows from, and every
    statistic of `sums` must keep one shape whatever the batch size (a sum over the batch).
    UsageError, one line, otherwise; found here, each would fail every rank mid-training.
    The model runs in evaluation mode (no BatchNorm statistics or dropout draws change)."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    was_training = model.training
    model.eval()
    try:
        out = model(x).float()
    finally:
        model.train(was_training)
    shapes = f"out {_shape(out)}, y {_shape(y)} {str(y.dtype).replace('torch.', '')}"
    try:
        loss = task.loss(out, y)
    except Exception as e:  # noqa: BLE001 - the user's code: any error is bad input
        raise UsageError(f"--task {spec}: the loss fails on the first batch of --data "
                         f"({shapes}; out is shaped by the factory's output_shape): "
                         f"{_error(e)}") from None
    if not torch.is_tensor(loss) or loss.numel() != 1 or not loss.is_floating_point():
        got = f"shape {_shape(loss)}" if torch.is_tensor(loss) else type(loss).__name__
        raise UsageError(f"--task {spec}: the loss must return the batch's mean loss, a "
                         f"floating-point scalar tensor; on the first batch ({shapes}) it "
                         f"returned {got}")
    if any(p.requires_grad for p in model.parameters()) and not loss.requires_grad:
        raise UsageError(f"--task {spec}: the loss does not depend on the model's output "
                         f"(no gradient flows from it); compute it from `out`")
    try:
        sums = task.sums(out.detach(), y)
        one = task.zero_sums(device)  # the shapes for a batch of one sample
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--task {spec}: a metric fails on the first batch of --data "
                         f"({shapes}): {_error(e)}") from None
    for name, value in sums.items():
        shape = tuple(torch.as_tensor(value).shape)
        if name in one and shape != tuple(one[name].shape):
            raise UsageError(
                f"--task {spec}: metric {name} returned shape {shape} for a batch of {len(y)} "
                f"and {tuple(one[name].shape)} for one sample; a metric returns the sum over "
                f"the batch of a per-sample quantity, of one shape whatever the batch "
                f"(e.g. .sum() or .sum(0))")


def _shape(t) -> tuple:
    return tuple(t.shape)


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# -- totals across batches and ranks -------------------------------------------------------
def flatten(sums: dict) -> np.ndarray:
    """The statistics as one float64 vector (for an allreduce or a checkpoint)."""
    parts = [np.ravel(v.detach().cpu().numpy() if torch.is_tensor(v) else v) for v in sums.values()]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def unflatten(vector, like: dict) -> dict:
    """`vector` split into numpy arrays shaped like the statistics of `like`."""
    out, pos = {}, 0
    for k, v in like.items():
        n = int(np.prod(v.shape))
        out[k] = np.asarray(vector[pos:pos + n], dtype=np.float64).reshape(tuple(v.shape))
        pos += n
    return out
