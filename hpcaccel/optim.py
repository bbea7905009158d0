"""Optimizers and learning-rate schedules for data-parallel training.

Large global batches (batch x ranks) need the linear scaling rule with warm-up (Goyal et al.
2017, "Accurate, Large Minibatch SGD"): lr = base_lr x global_batch / ref_batch, reached
linearly over the warm-up steps, then cosine or step decay. LARS (You et al. 2017) scales
each layer's update by a trust ratio ||w|| / ||g|| so layers learn at similar relative rates.
"""
from __future__ import annotations

import math

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling.

    For each weight tensor: g <- g + wd*w; local_lr = eta*||w||/||g||;
    v <- m*v + lr*local_lr*g; w <- w - v. Biases and normalisation parameters (1-d) take
    plain momentum SGD steps, as is standard.
    """

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.0, eta=0.001, eps=1e-9):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, eps=eps))
        # tensor -> (||w||, ||g||) of the whole layer it is part of, computed across ranks by
        # a sharded optimizer (comm/sharding.py); a tensor listed here is a layer's piece
        self.layer_norms = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                trust = torch.ones(())
                norms = self.layer_norms.get(p)
                if norms is not None or p.ndim > 1:
                    w_norm, g_norm = norms if norms is not None else (
                        torch.linalg.vector_norm(p), torch.linalg.vector_norm(g))
                    if w_norm > 0 and g_norm > 0:
                        trust = group["eta"] * w_norm / (g_norm + group["eps"])
                buf = self.state[p].get("momentum_buffer")
                update = g.mul(trust * group["lr"])
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = update.clone()
                else:
                    buf.mul_(group["momentum"]).add_(update)
                p.sub_(buf)
        return loss


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: biases and normalisation parameters (1-d) are exempt,
    as is standard practice (and required for LARS to behave)."""
    decay, exempt = [], []
    for p in model.parameters():
        if p.requires_grad:
            (exempt if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0})
    return groups


def make_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer a TrainConfig asks for, over `model`'s trainable parameters."""
    return build_optimizer(cfg.optimizer, model, cfg.lr, cfg.momentum, cfg.weight_decay,
                           nesterov=cfg.nesterov)


def build_optimizer(name: str, model: torch.nn.Module, lr: float, momentum: float,
                    weight_decay: float, nesterov: bool = False) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}")


def scaled_lr(base_lr: float, global_batch: int, ref_batch: int | None) -> float:
    """Linear scaling rule: with ref_batch None (off) the lr is used as given."""
    return base_lr if not ref_batch else base_lr * global_batch / ref_batch


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str,
              step_every: int = 0, step_gamma: float = 0.1) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based). Pure.

    Warm-up rises linearly from 1/warmup to 1 over `warmup_steps`; then `constant`,
    `cosine` (to 0 at total_steps) or `step` (x step_gamma every step_every steps).
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    after = step - warmup_steps
    span = max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(after, span) / span))
    if schedule == "step" and step_every:
        return step_gamma ** (after // step_every)
    return 1.0


def squared_norm(grads) -> float:
    """Local. The sum of squares of `grads`, in float64: every square of a float32 is exact
    there, so sums over differently split gradients (whole tensors on one rank, pieces of
    them across ranks) agree to float64 rounding, far below float32's."""
    total = torch.zeros((), dtype=torch.float64)
    for g in grads:
        total += g.detach().double().square().sum()
    return float(total)


def clip_grad_norm_(grads, max_norm: float, sum_across=None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm) over `grads`, in place; returns the total norm.

    The norm is summed in float64 and rounded to float32 once, so the coefficient is the same
    float32 number whether the gradient is whole on each rank or split in pieces across ranks
    (`sum_across`: a collective summing one float over the ranks holding the other pieces).
    torch's own float32 reduction depends on how the gradient is split; AdamW near the
    clipping threshold amplifies that last-bit difference into a different run (its update
    is ~lr x sign(g) where the second moment is tiny)."""
    grads = [g for g in grads if g is not None]
    sq = squared_norm(grads)
    if sum_across is not None:
        sq = sum_across(sq)
    total = torch.tensor(math.sqrt(sq) if sq >= 0 else float("nan"), dtype=torch.float32)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class LRSchedule:
    """Peak lr (linear scaling rule), warm-up, then constant/cosine/step decay; set on the
    optimizer before every step from the global step, so a resumed run follows the same
    curve. Identical on every rank (same step, same global batch)."""

    def __init__(self, cfg, world_size: int, steps_per_epoch: int):
        self.peak = scaled_lr(cfg.lr, cfg.batch_size * world_size, cfg.lr_ref_batch)
        self.total = cfg.epochs * steps_per_epoch
        self.warmup = round(cfg.warmup_epochs * steps_per_epoch)
        self.schedule = cfg.lr_schedule
        self.step_every = cfg.lr_step_epochs * steps_per_epoch
        self.gamma = cfg.lr_step_gamma

    def lr(self, step: int) -> float:
        return self.peak * lr_factor(step, self.total, self.warmup, self.schedule,
                                     self.step_every, self.gamma)
