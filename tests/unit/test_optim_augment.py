"""Optimizers, LR schedules and augmentation: pure logic on small tensors."""
import math

import pytest
import torch

from hpcaccel.augment import augment, generator, random_flip, random_shift
from hpcaccel.optim import LARS, build_optimizer, lr_factor, param_groups, scaled_lr


def test_linear_scaling_and_warmup_then_cosine():
    assert scaled_lr(0.1, 1024, 256) == pytest.approx(0.4)
    assert scaled_lr(0.1, 1024, None) == 0.1
    f = [lr_factor(s, 100, 10, "cosine") for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10]))  # rising during warm-up
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then decaying
    assert f[10] == pytest.approx(1.0) and f[-1] < 0.01
    assert lr_factor(55, 100, 10, "step", step_every=20) == pytest.approx(0.01)
    assert lr_factor(50, 100, 0, "constant") == 1.0


def test_weight_decay_exempts_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[1]["weight_decay"] == 0.0


def test_lars_trust_ratio_bounds_the_update():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10, 10))
    w.grad = torch.randn(10, 10) * 1000  # a huge gradient
    before = w.detach().clone()
    LARS([w], lr=1.0, momentum=0.0, eta=0.001).step()
    # update norm = lr * eta * ||w||, whatever ||g|| is
    assert float(torch.linalg.vector_norm(before - w.detach())) == pytest.approx(
        0.001 * float(torch.linalg.vector_norm(before)), rel=1e-4)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_every_optimizer_reduces_a_quadratic(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = (build_optimizer(name, model, lr=0.05, momentum=0.9, weight_decay=0.0) if name != "lars"
           else LARS(model.parameters(), lr=0.5, momentum=0.9, eta=0.05))
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_augmentation_is_deterministic_per_rank_and_step():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    a = augment(x, "shift+flip", generator(1, 2, 0, 3))
    assert torch.equal(a, augment(x, "shift+flip", generator(1, 2, 0, 3)))
    assert not torch.equal(a, augment(x, "shift+flip", generator(1, 2, 1, 3)))  # other rank
    assert a.shape == x.shape


def test_shift_moves_content_and_flip_mirrors():
    x = torch.zeros(50, 1, 3, 3)
    x[:, 0, 1, 1] = 1
    shifted = random_shift(x, 1, torch.Generator().manual_seed(0))
    assert (shifted.sum(dim=(1, 2, 3)) == 1).all()  # a 1-pixel shift keeps the centre pixel
    assert not (shifted[:, 0, 1, 1] == 1).all()     # but moves it for some images
    row = torch.tensor([[[[1.0, 2.0, 3.0]]]]).repeat(40, 1, 1, 1)
    flipped = random_flip(row, torch.Generator().manual_seed(0))
    kinds = {tuple(r.flatten().tolist()) for r in flipped}
    assert kinds == {(1.0, 2.0, 3.0), (3.0, 2.0, 1.0)}
