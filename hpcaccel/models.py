"""Built-in models, and user models given as `package.module:factory`.

Every model is built as factory(input_shape, num_classes) -> torch.nn.Module. The built-in
CNNs name their parts `body` and `head`, so fine-tuning can `--freeze body` and a different
class count gets a new head.
"""
from __future__ import annotations

import importlib
import math

import torch
from torch import nn

from .errors import UsageError


def mlp(input_shape, num_classes, hidden=(256, 256), dropout=0.0) -> nn.Module:
    layers, width = [nn.Flatten()], math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape, num_classes, width=32, dropout=0.0) -> nn.Module:
    """Two conv blocks (`body`) and a linear `head`; works for any spatial size >= 1."""
    if len(input_shape) != 3:
        raise UsageError(f"--model cnn needs samples shaped (channels, height, width), "
                         f"got {tuple(input_shape)}; use --model mlp")
    c = input_shape[0]
    body = nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.MaxPool2d(2) if min(input_shape[1:]) >= 2 else nn.Identity(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Dropout(dropout) if dropout else nn.Identity(),
    )
    return _with_head(body, 2 * width * 4, num_classes)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet(input_shape, num_classes, width=32, blocks=(1, 1, 1), dropout=0.0) -> nn.Module:
    """A small ResNet-style CNN: stem, three stages of residual blocks (stride 2 between
    stages), global average pooling, linear head. The head is the attribute `head`, so
    fine-tuning can replace it."""
    if len(input_shape) != 3:
        raise UsageError(f"--model resnet needs samples shaped (channels, height, width), "
                         f"got {tuple(input_shape)}")
    layers = [nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for stage, n in enumerate(blocks):
        cout = width * 2 ** stage
        for i in range(n):
            layers.append(BasicBlock(cin, cout, 2 if stage and i == 0 else 1))
            cin = cout
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Dropout(dropout) if dropout else nn.Identity())
    return _with_head(net, cin, num_classes)


class _Classifier(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x):
        return self.head(self.body(x))


def _with_head(body: nn.Module, features: int, num_classes: int) -> nn.Module:
    return _Classifier(body, nn.Linear(features, num_classes))


BUILTIN = {"mlp": mlp, "cnn": cnn, "resnet": resnet}


def build_model(name: str, input_shape, num_classes: int, dropout: float = 0.0) -> nn.Module:
    if name in BUILTIN:
        return BUILTIN[name](tuple(input_shape), num_classes, dropout=dropout)
    if ":" not in name:
        raise UsageError(f"--model: unknown model {name!r} (built-in: {', '.join(BUILTIN)}; "
                         f"or package.module:factory)")
    module_name, attr = name.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--model {name}: cannot load factory ({e})") from None
    model = factory(tuple(input_shape), num_classes)
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {name}: factory returned {type(model).__name__}, not a torch.nn.Module")
    return model
