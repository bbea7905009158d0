"""Horovod's clipping recipe on a sharded hvd.DistributedOptimizer.

    optimizer.synchronize()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    with optimizer.skip_synchronize():
        optimizer.step()

Sharded, a parameter's .grad is None after synchronize() (each rank holds only its part of
the reduced gradient), so torch's function would find no gradient, return 0 and clip
nothing. While a sharded optimizer is alive, torch.nn.utils.clip_grad_norm_ is therefore
routed here: over that optimizer's parameters (all or some) it clips by the norm of the
whole gradient, summed across ranks (optimizer.clip_grad_norm_, collective: every rank calls
it, as the recipe does); a call it cannot serve fails naming optimizer.clip_grad_norm_. A
script that bound the function before (`from torch.nn.utils import clip_grad_norm_`) reaches
torch's own, which fails the same way through the guard on its inner clipping step.
Parameters of no sharded optimizer go to torch's function unchanged.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad as _clip_grad

_SHARDED: "weakref.WeakSet" = weakref.WeakSet()  # sharded distributed optimizers alive
_ORIGINAL = {}  # name -> torch's function, once installed

_USE_OURS = ("on a sharded hvd.DistributedOptimizer's parameters, whose .grad is None after "
             "synchronize() (each rank holds only its part of the gradient): call "
             "optimizer.clip_grad_norm_(max_norm) on every rank instead")


def register(optimizer) -> None:
    """A sharded distributed optimizer was made: route torch's clipping of its parameters."""
    _install()
    _SHARDED.add(optimizer)


def _owner(params):
    """(the sharded optimizer holding any of `params`, whether it holds all trainable ones)."""
    ids = {id(p) for p in params if p.requires_grad}
    for opt in list(_SHARDED):
        mine = {id(p) for p in opt._hvd_reducer._params}
        if ids & mine:
            return opt, ids <= mine
    return None, False


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                    foreach=None):
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    opt, inside = _owner(params)
    if opt is None:
        return _ORIGINAL["clip_grad_norm_"](params, max_norm, norm_type, error_if_nonfinite,
                                            foreach)
    if not inside or float(norm_type) != 2.0:
        why = "parameters of more than one optimizer" if not inside else f"norm_type={norm_type}"
        raise RuntimeError(f"torch.nn.utils.clip_grad_norm_ with {why} {_USE_OURS} (2-norm)")
    total = opt.clip_grad_norm_(max_norm, parameters=[p for p in params if p.requires_grad])
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from "
                           f"`parameters` is non-finite, so it cannot be clipped.")
    return total


def _guarded_clip_grads_with_norm_(parameters, *args, **kwargs):
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if _owner(params)[0] is not None:
        raise RuntimeError(f"torch.nn.utils.clip_grad_norm_ (bound before the optimizer was "
                           f"made) {_USE_OURS}")
    return _ORIGINAL["_clip_grads_with_norm_"](params, *args, **kwargs)


def _install() -> None:
    if _ORIGINAL:
        return
    _ORIGINAL["clip_grad_norm_"] = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
    if hasattr(_clip_grad, "_clip_grads_with_norm_"):  # torch >= 2.6: the inner step
        _ORIGINAL["_clip_grads_with_norm_"] = _clip_grad._clip_grads_with_norm_
        _clip_grad._clip_grads_with_norm_ = _guarded_clip_grads_with_norm_
