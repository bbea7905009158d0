"""--compression powersgd through `python -m hpcaccel.train` under real mpirun: resume after
SIGUSR1 equals an uninterrupted run, it trains alongside accumulation, bf16 autocast,
clipping, frozen and unused parameters, digits reach 95% at 4 ranks, Horovod refuses it."""
import json
import signal
import subprocess
import time

import torch

from hpcaccel import checkpoint
from support import assert_same_model, mpirun_command, train_cli

PSGD = ["--backend", "mpi", "--compression", "powersgd", "--powersgd-rank", "2",
        "--powersgd-start-step", "10"]
RESUME_ARGS = ["--data", "synthetic", "--synthetic-samples", "4096", "--synthetic-shape", "64",
               "--model", "mlp", "--epochs", "4", "--batch-size", "16", "--progress", "false",
               *PSGD]

# A model with a branch no rank ever uses, for the run below (loaded as unused_branch:build).
UNUSED_BRANCH = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, features, classes):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(features, 256), nn.ReLU(),
                                  nn.Linear(256, 256), nn.ReLU())
        self.spare = nn.Linear(256, 256)   # never called: no rank produces its gradient
        self.head = nn.Linear(256, classes)

    def forward(self, x):
        return self.head(self.body(x))


def build(input_shape, num_classes):
    features = 1
    for s in input_shape:
        features *= s
    return Net(features, num_classes)
'''


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


def run_until_signalled(cmd, after_line="epoch 1/", timeout=240):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if after_line in line:
            proc.send_signal(signal.SIGUSR1)  # forwarded by mpirun to every rank, as Slurm's warning
            break
        assert time.time() < deadline, "".join(lines)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(lines) + out


def test_sigusr1_then_resume_equals_an_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    r = subprocess.run(mpirun_command(2, "-m", "hpcaccel.train", *RESUME_ARGS, "--out", str(full)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    rc, out = run_until_signalled(mpirun_command(2, "-m", "hpcaccel.train", *RESUME_ARGS,
                                                 "--out", str(part)))
    assert rc == 3, out[-3000:]
    saved = torch.load(checkpoint.list_checkpoints(str(part))[-1], weights_only=True)
    assert len(saved["reducer"]) == 2  # every rank's error feedback, not rank 0's only
    assert saved["global_step"] > 10   # stopped while compressing, not in the exact phase
    r = subprocess.run(mpirun_command(2, "-m", "hpcaccel.train", *RESUME_ARGS, "--out", str(part),
                                      "--resume", "auto"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    assert_same_model(part / "model.pt", full / "model.pt")


def test_trains_with_accumulation_bf16_clipping_frozen_and_unused(tmp_path):
    (tmp_path / "unused_branch.py").write_text(UNUSED_BRANCH)
    out = tmp_path / "run"
    r = train_cli(2, *PSGD, "--out", str(out), "--model", "unused_branch:build",
                  "--epochs", "5", "--accum-steps", "2", "--precision", "bf16",
                  "--clip-grad-norm", "1.0", "--freeze", "body.1",
                  env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = summary_of(out)
    assert summary["world_size"] == 2 and summary["test_accuracy"] >= 0.85, summary
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        from unused_branch import build
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)  # --seed 0: how hpcaccel.train initialises the model
    initial = build((1, 8, 8), 10).state_dict()
    final = torch.load(out / "model.pt", weights_only=True)
    for name in ("body.1.weight", "body.1.bias", "spare.weight", "spare.bias"):
        assert torch.equal(final[name], initial[name]), name  # frozen, and never used
    assert not torch.equal(final["body.3.weight"], initial["body.3.weight"])


def test_digits_at_4_ranks_reaches_95_percent(tmp_path):
    out = tmp_path / "run"
    r = train_cli(4, "--backend", "mpi", "--compression", "powersgd", "--out", str(out),
                  "--epochs", "10")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = summary_of(out)
    assert summary["world_size"] == 4 and summary["test_accuracy"] >= 0.95, summary
    assert summary["config"]["compression"] == "powersgd"


def test_horovod_backend_refuses_it_in_one_line(tmp_path):
    r = train_cli(2, "--backend", "horovod", "--compression", "powersgd",
                  "--out", str(tmp_path / "run"), timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("hpcaccel: error:")]
    assert len(errors) == 1 and "--compression powersgd" in errors[0], r.stderr[-2000:]
