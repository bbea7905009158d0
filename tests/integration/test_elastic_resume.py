"""A run continued at another world size ends where an uninterrupted run ends: the global
batch is kept (more or fewer samples per rank, other accumulation), the interrupted epoch
goes on at the exact sample (shuffle off: the very same global batches), and the epoch's
metrics carry over. Within float tolerance: the order of additions in the mean differs."""
import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from hpcaccel import checkpoint
from support import mpirun_command

# its tests share runs (module fixtures): one worker runs them all (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("elastic_resume")

# 64 steps per epoch at global batch 32; shuffle off
ARGS = ["--data", "synthetic", "--synthetic-samples", "2048", "--synthetic-shape", "32",
        "--model", "mlp", "--epochs", "2", "--shuffle", "false", "--backend", "mpi",
        "--threads", "1", "--progress", "false"]


def train(np_, out, *args):
    return mpirun_command(np_, "-m", "hpcaccel.train", *ARGS, "--out", str(out), *args)


def run(cmd, timeout=300):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def stopped_mid_epoch(cmd, timeout=240):
    """Run until the first epoch's line, then SIGUSR1 to mpirun (forwarded to every rank):
    the ranks agree on a step early in epoch 2, checkpoint it and exit 3."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if "epoch 1/" in line:
            proc.send_signal(signal.SIGUSR1)
            break
        assert time.time() < deadline, "".join(lines)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 3, "".join(lines) + out
    return "".join(lines) + out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run(train(2, out, "--batch-size", "16"))
    return out


def assert_close_models(got, want):
    got, want = (torch.load(p, weights_only=True) for p in (got, want))
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("before,after,batch", [(2, 1, 16), (1, 2, 32)],
                         ids=["2-ranks-resumed-at-1", "1-rank-resumed-at-2"])
def test_resumed_at_another_world_size_equals_the_uninterrupted_run(
        tmp_path, uninterrupted, before, after, batch):
    out = tmp_path / "run"
    stopped_mid_epoch(train(before, out, "--batch-size", str(batch)))
    head = checkpoint.header(checkpoint.list_checkpoints(str(out))[-1])
    assert head["world_size"] == before and head["epoch"] == 1 and 0 < head["step_in_epoch"] < 64

    # the same flags, another rank count: the global batch 32 is the run's
    text = run(train(after, out, "--batch-size", str(batch), "--resume", "auto"))
    per_rank = 32 // after
    assert (f"{after} rank{'s continue' if after > 1 else ' continues'} the checkpoint of {before} "
            f"rank{'s' if before > 1 else ''}: global batch 32 kept as {after} x --batch-size "
            f"{per_rank}") in text, text
    assert f"at sample {head['step_in_epoch'] * 32} (step {head['step_in_epoch']})" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == after and summary["config"]["batch_size"] == per_rank
    assert summary["resized_from_world_size"] == before
    assert (summary["restarts"], summary["steps_lost"]) == (1, 0)  # a clean stop loses nothing
    assert summary["steps"] == 128
    assert_close_models(out / "model.pt", uninterrupted / "model.pt")
    want = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=2e-3)
    # the interrupted epoch's metrics carry over the change of rank count
    assert summary["final_train_loss"] == pytest.approx(want["final_train_loss"], rel=1e-4)


def test_a_global_batch_the_ranks_cannot_split_is_one_line(tmp_path):
    out = tmp_path / "run"
    run(train(1, out, "--batch-size", "15", "--epochs", "1"))
    r = subprocess.run(train(2, out, "--batch-size", "15", "--epochs", "2", "--resume", "auto"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("hpcaccel: error:")]
    assert len(errors) == 1, r.stderr
    assert "its global batch 15 (1 x 15) cannot be kept on 2 ranks: 15 is not a multiple of 2" \
        in errors[0]


def ranks_of(out) -> list[int]:
    """The rank processes writing to `out` (python, not mpirun or its wrapper)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
            with open(f"/proc/{pid}/comm") as fh:
                comm = fh.read().strip()
        except OSError:
            continue
        if comm.startswith("python") and b"hpcaccel.train" in argv and str(out).encode() in argv:
            found.append(int(pid))
    assert found, f"no ranks of {out}"
    return found


def test_timed_checkpoints_and_a_killed_rank_count_the_steps_lost(tmp_path):
    """--checkpoint-every-seconds: every rank checkpoints at the same step (the save is
    collective: a rank that did not would hang it). A rank killed later: the run resumed at
    1 rank counts the steps taken past the last checkpoint as lost."""
    out = tmp_path / "run"
    longer = ["--synthetic-samples", "16384", "--epochs", "3"]  # 512 steps per epoch
    cmd = train(2, out, "--batch-size", "16", *longer, "--checkpoint-every-seconds", "0.5",
                "--keep-checkpoints", "50")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch 1/" in line:
            break
    # past a timed checkpoint inside epoch 2 (step 512 ends epoch 1), into the steps after
    # it: watched on the run's own files, not after a fixed sleep, so a loaded machine
    # cannot let the run end first
    deadline = time.monotonic() + 120
    while not any(int(re.search(r"step-(\d+)", p).group(1)) > 512
                  for p in checkpoint.list_checkpoints(str(out))):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        time.sleep(0.02)
    os.kill(max(ranks_of(out)), signal.SIGKILL)  # a rank dies, as with its node
    out_text, _ = proc.communicate(timeout=120)
    lines.append(out_text)
    assert proc.returncode not in (0, 3), "".join(lines)
    assert not (out / "summary.json").exists(), "the run ended before the kill: " + "".join(lines)
    saved = checkpoint.list_checkpoints(str(out))
    mid = [checkpoint.header(p) for p in saved if checkpoint.header(p)["step_in_epoch"]]
    assert mid, "no timed checkpoint inside an epoch"
    progress = json.loads((out / "progress.json").read_text())
    last = checkpoint.header(saved[-1])["global_step"]

    said = run(train(1, out, "--batch-size", "16", *longer, "--resume", "auto"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"] == 1, (saved, said[-3000:], "".join(lines)[-2000:])
    assert summary["steps_lost"] == max(0, progress["step"] - last)
    assert summary["last_restart"]["world_size_before"] == 2
    assert summary["steps"] == 3 * 512
