"""Built-in models, and user models given as `package.module:factory`.

Every model is built as factory(input_shape, output_shape) -> torch.nn.Module, output_shape
being what the task needs per sample (tasks.py): (classes,) to classify, y's shape to
regress, (classes, *y's shape) to segment. Every built-in model fits every task: mlp, cnn
and resnet end in a linear head of prod(output_shape) outputs, reshaped; fcn is a small
fully convolutional net, a class (or value) per pixel. The built-in CNNs name their parts
`body` and `head`, so fine-tuning can `--freeze body` and a different output gets a new head.
"""
from __future__ import annotations

import importlib
import inspect
import math

import torch
from torch import nn

from .errors import UsageError


def mlp(input_shape, output_shape, hidden=(256, 256), dropout=0.0) -> nn.Module:
    output_shape = _shape(output_shape)
    layers, width = [nn.Flatten()], math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, math.prod(output_shape)))
    if len(output_shape) > 1:
        layers.append(nn.Unflatten(1, output_shape))
    return nn.Sequential(*layers)


def cnn(input_shape, output_shape, width=32, dropout=0.0) -> nn.Module:
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
    return _with_head(body, 2 * width * 4, output_shape)


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


def resnet(input_shape, output_shape, width=32, blocks=(1, 1, 1), dropout=0.0) -> nn.Module:
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
    return _with_head(net, cin, output_shape)


def fcn(input_shape, output_shape, width=32, dropout=0.0) -> nn.Module:
    """Fully convolutional, a class (or value) per pixel: three 3x3 convolutions (dilated
    1, 2, 4: a 15 x 15 receptive field) keeping the image size (`body`), then a 1x1
    convolution to the output channels (`head`). Output (K, H, W), or (H, W) for one value
    per pixel, where the samples are (C, H, W)."""
    output_shape = _shape(output_shape)
    if len(input_shape) != 3 or len(output_shape) not in (2, 3) or \
            tuple(output_shape[-2:]) != tuple(input_shape[1:]):
        raise UsageError(f"--model fcn outputs a class or value per pixel of samples shaped "
                         f"(channels, height, width): it cannot map {tuple(input_shape)} to "
                         f"{output_shape}; use --model cnn or mlp")
    layers, cin = [], input_shape[0]
    for dilation in (1, 2, 4):
        layers += [nn.Conv2d(cin, width, 3, padding=dilation, dilation=dilation),
                   nn.BatchNorm2d(width), nn.ReLU()]
        cin = width
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    channels = output_shape[0] if len(output_shape) == 3 else 1
    return _BodyHead(nn.Sequential(*layers), nn.Conv2d(width, channels, 1),
                     output_shape if len(output_shape) == 2 else None)


class _BodyHead(nn.Module):
    """body, then head; the head's output reshaped to `output_shape` per sample (None:
    as it is)."""

    def __init__(self, body: nn.Module, head: nn.Module, output_shape=None):
        super().__init__()
        self.body, self.head = body, head
        self.output_shape = tuple(output_shape) if output_shape is not None else None

    def forward(self, x):
        out = self.head(self.body(x))
        return out if self.output_shape is None else out.reshape(len(out), *self.output_shape)


def _with_head(body: nn.Module, features: int, output_shape) -> nn.Module:
    output_shape = _shape(output_shape)
    return _BodyHead(body, nn.Linear(features, math.prod(output_shape)),
                     output_shape if len(output_shape) > 1 else None)


def _shape(output_shape) -> tuple:
    """An output shape as a tuple; a bare int (a class count) is (classes,)."""
    if isinstance(output_shape, int):
        return (output_shape,)
    return tuple(int(s) for s in output_shape)


BUILTIN = {"mlp": mlp, "cnn": cnn, "resnet": resnet, "fcn": fcn}


def auto_choice(input_shape, output_shape) -> str:
    """--model auto: fcn where the output is per pixel of image-shaped samples (segment, or
    fields regressed pixel by pixel), cnn for other image-shaped samples, else mlp."""
    input_shape, output_shape = tuple(input_shape), _shape(output_shape)
    if len(input_shape) == 3:
        per_pixel = len(output_shape) in (2, 3) and output_shape[-2:] == input_shape[1:]
        return "fcn" if per_pixel else "cnn"
    return "mlp"


def build_model(name: str, input_shape, output_shape, dropout: float = 0.0) -> nn.Module:
    """Build --model `name` for samples of `input_shape` and check that it outputs
    `output_shape` per sample (an int: a class count). A factory of one's own gets the
    output shape, or the output count (see _second_argument)."""
    input_shape, output_shape = tuple(input_shape), _shape(output_shape)
    if name == "auto":
        name = auto_choice(input_shape, output_shape)
    if name in BUILTIN:
        model = BUILTIN[name](input_shape, output_shape, dropout=dropout)
    elif ":" not in name:
        raise UsageError(f"--model: unknown model {name!r} (built-in: auto, "
                         f"{', '.join(BUILTIN)}; or package.module:factory)")
    else:
        module_name, attr = name.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"--model {name}: cannot load factory ({e})") from None
        model = factory(input_shape, _second_argument(factory, name, output_shape))
        if not isinstance(model, nn.Module):
            raise UsageError(f"--model {name}: factory returned {type(model).__name__}, not a "
                             f"torch.nn.Module")
    check_output(model, name, input_shape, output_shape)
    return model


def _second_argument(factory, name: str, output_shape: tuple):
    """What a factory of one's own gets after the input shape: the output shape (a tuple)
    when its second parameter says shape (output_shape), else, for outputs of one dimension,
    their count as an int: the classifier form before tasks, factory(input_shape,
    num_classes), keeps working for every task with vector outputs."""
    try:
        params = list(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        params = []
    if len(params) < 2 or "shape" in params[1]:
        return output_shape
    if len(output_shape) != 1:
        raise UsageError(f"--model {name}: factory(input_shape, {params[1]}) takes a count of "
                         f"outputs, this task needs outputs shaped {output_shape}; write it "
                         f"as factory(input_shape, output_shape)")
    return output_shape[0]


def check_output(model: nn.Module, name: str, input_shape, output_shape) -> None:
    """UsageError unless `model` maps a batch of samples shaped `input_shape` to outputs
    shaped `output_shape` per sample. One forward pass of two zero samples in eval mode (no
    BatchNorm statistics change); it also creates lazy modules' parameters."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters(), torch.zeros(0)).device
            out = model(torch.zeros(2, *input_shape, device=device))
    except Exception as e:  # noqa: BLE001 - a model that cannot take the samples is bad input
        first = (str(e).splitlines() or [""])[0]
        raise UsageError(f"--model {name}: fails on samples shaped {tuple(input_shape)} "
                         f"({type(e).__name__}: {first})") from None
    finally:
        model.train(was_training)
    got = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None
    if got != tuple(output_shape):
        what = f"outputs shaped {got} per sample" if got is not None else \
            f"returns {type(out).__name__}, not a tensor"
        raise UsageError(f"--model {name}: {what}, the task needs {tuple(output_shape)}")
