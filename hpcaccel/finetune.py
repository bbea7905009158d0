"""Fine-tuning and transfer learning: start from another run's weights, freeze layers.

`--init-from` accepts a plain state_dict (a run's model.pt) or an hpcaccel checkpoint. Every
tensor whose name and shape match the new model is loaded; the rest (typically the head,
when the class count differs) keeps its fresh initialisation. It runs before parameters are
broadcast from rank 0, so only rank 0's load matters, but every rank loads (and validates)
the file so bad input is agreed on collectively.
"""
from __future__ import annotations

import torch

from .errors import UsageError


def read_state_dict(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--init-from {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        first = (str(e).splitlines() or [""])[0]
        raise UsageError(f"--init-from {path}: not a readable model file ({type(e).__name__}: "
                         f"{first})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # an hpcaccel checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--init-from {path}: not a state_dict or hpcaccel checkpoint")
    return state


def load_matching(model: torch.nn.Module, path: str) -> tuple[list[str], list[str]]:
    """Copy the tensors of `path` whose name and shape match into `model`.
    Returns (loaded, kept_fresh) parameter/buffer names."""
    source = read_state_dict(path)
    own = model.state_dict()
    loaded = [k for k, v in source.items() if k in own and own[k].shape == v.shape]
    if not loaded:
        raise UsageError(f"--init-from {path}: no tensor matches this model by name and shape "
                         f"(is it the same --model?)")
    model.load_state_dict({k: source[k] for k in loaded}, strict=False)
    return loaded, [k for k in own if k not in loaded]


def freeze(model: torch.nn.Module, prefixes: list[str]) -> list[str]:
    """Stop training parameters whose names start with any prefix (requires_grad False, so
    they are left out of the optimizer and the gradient allreduce). Returns their names."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(_under(n, prefix) for n in names):
            sample = ", ".join(sorted({n.split(".")[0] for n in names})[:8])
            raise UsageError(f"--freeze {prefix}: no parameter name starts with it "
                             f"(top-level names: {sample})")
    frozen = []
    for name, p in model.named_parameters():
        if any(_under(name, prefix) for prefix in prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    if len(frozen) == len(names):
        raise UsageError(f"--freeze {','.join(prefixes)}: freezes every parameter; nothing "
                         f"would train")
    return frozen


def _under(name: str, prefix: str) -> bool:
    """`body` covers body.0.weight but not bodyguard.weight."""
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def parse_prefixes(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]
