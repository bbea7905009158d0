"""Run outputs: metrics.jsonl, summary.json, model.pt, written by rank 0 only.

Other ranks get a NullRunLog, so the training loop never asks which rank it is on.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch


def atomic_write(path: str, write) -> None:
    """Write via a temp file in the same directory, fsync, rename: readers and crashes see
    the old file or the new one, never a torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RunLog:
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self._metrics = open(os.path.join(out_dir, "metrics.jsonl"), "w")

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
