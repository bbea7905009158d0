"""Run outputs: metrics.jsonl, summary.json, model.pt, written by rank 0 only; the progress
bar, shown by rank 0 only.

Other ranks get a NullRunLog and NullProgress, so the training loop never asks which rank
it is on.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from .fsutil import atomic_write
from .terminal import terminal_behind


class RunLog:
    def __init__(self, out_dir: str, append: bool = False):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        # a resumed run continues the same metrics file
        self._metrics = open(os.path.join(out_dir, "metrics.jsonl"), "a" if append else "w")

    def metrics(self, record: dict) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def summary(self, record: dict) -> None:
        data = (json.dumps(record, indent=2) + "\n").encode()
        atomic_write(os.path.join(self.out_dir, "summary.json"), lambda fh: fh.write(data))

    def model(self, state_dict: dict) -> None:
        atomic_write(os.path.join(self.out_dir, "model.pt"), lambda fh: torch.save(state_dict, fh))

    def info(self, line: str) -> None:
        print(line, flush=True)

    def close(self) -> None:
        self._metrics.close()


class NullRunLog:
    """What non-zero ranks log: nothing."""

    def metrics(self, record):
        pass

    def summary(self, record):
        pass

    def model(self, state_dict):
        pass

    def info(self, line):
        pass

    def close(self):
        pass


class NullProgress:
    """A progress bar that shows nothing (other ranks, --progress false, tests)."""

    def __init__(self, **kwargs):
        pass

    def set_postfix(self, **kwargs):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass


def bar_wanted(choice: str, stream=None, env=None) -> bool:
    """Local. Whether --progress `choice` (auto, true, false) shows the bar on `stream`
    (default stderr): auto only where the user's terminal is behind it, directly or through
    mpirun (terminal.py), so Slurm logs and pipes get no '\\r' fragments."""
    if choice in ("auto", None):
        return terminal_behind(sys.stderr if stream is None else stream,
                               os.environ if env is None else env)
    return choice in (True, "true")


def progress_bar(enabled: bool):
    """progress(total=, initial=, desc=) -> a bar: tqdm's where enabled, else NullProgress."""
    if not enabled:
        return NullProgress
    from tqdm import tqdm
    return lambda **kw: tqdm(leave=False, mininterval=0.5, dynamic_ncols=True, **kw)
