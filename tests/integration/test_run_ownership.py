"""One run per --out, through the CLI at 2 ranks: a fresh run never mixes with another run's
outputs, --resume auto takes only its own run's checkpoints, a finished run stays finished,
a lock keeps two live runs apart and a crashed run's lock is taken over; start-up warnings.
"""
import json
import os
import re
import signal
import socket
import subprocess
import time

import h5py
import numpy as np
import pytest
import torch

from hpcaccel import checkpoint, rundir
from support import mpirun_command, requires_horovod, train_cli

NP = 2
SMALL = ["--data", "synthetic", "--synthetic-samples", "256", "--synthetic-shape", "16",
         "--model", "mlp", "--batch-size", "16"]


def train(out, *args, timeout=240, env=None):
    return train_cli(NP, *SMALL, "--out", str(out), *args, timeout=timeout, env=env)


def errors(r):
    return [l for l in r.stderr.splitlines() if l.startswith("hpcaccel: error:")]


def snapshot(out):
    """Every file under out with its bytes and mtime (what "untouched" means)."""
    found = {}
    for root, _, files in os.walk(out):
        for name in files:
            p = os.path.join(root, name)
            found[os.path.relpath(p, out)] = (open(p, "rb").read(), os.stat(p).st_mtime_ns)
    return found


@pytest.fixture
def finished(tmp_path):
    """A finished 2-epoch run."""
    out = tmp_path / "run"
    r = train(out, "--epochs", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_fresh_run_into_another_runs_outputs_stops_then_overwrite_moves_it_aside(finished):
    out = finished
    before = snapshot(out)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    r = train(out, "--epochs", "1")
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = errors(r)
    assert str(out) in line and run_id in line
    assert "--resume auto" in line and "new --out" in line and "--overwrite true" in line
    assert snapshot(out) == before  # nothing of the earlier run touched

    r = train(out, "--epochs", "1", "--overwrite", "true")
    assert r.returncode == 0, r.stderr[-2000:]
    aside = out / "previous" / run_id
    assert f"moved the previous run's outputs to {aside}/" in r.stdout
    for name, (data, _) in before.items():  # the old run, complete, in previous/<id>/
        assert (aside / name).read_bytes() == data, name
    new = json.loads((out / "run.json").read_text())
    assert new["run_id"] != run_id and new["epochs"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))] == [
        f"step-{256 // (16 * NP):08d}.pt"]


def test_finished_run_stays_finished_and_a_larger_epochs_extends_it(finished):
    out = finished
    before = snapshot(out)
    r = train(out, "--epochs", "2", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already complete" in r.stdout
    assert snapshot(out) == before  # summary.json, metrics.jsonl, model.pt untouched

    r = train(out, "--epochs", "3", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in records] == [1, 2, 3]  # appended
    summary = json.loads((out / "summary.json").read_text())
    steps_per_epoch = 256 // (16 * NP)
    assert summary["epochs"] == 3 and summary["steps"] == 3 * steps_per_epoch
    assert summary["samples_per_second"] > 0
    assert json.loads((out / "run.json").read_text())["epochs"] == 3
    # what ran, not what was asked for: --allreduce auto's choice on one host
    assert (summary["allreduce"], summary["compression"]) == ("sliced", "none")


def test_resume_auto_refuses_another_runs_state(finished, tmp_path):
    out = finished
    before = snapshot(out)
    # same directory, a different global batch (ranks x --batch-size): not this run
    r = train(out, "--epochs", "3", "--resume", "auto", "--batch-size", "8")
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = errors(r)
    assert "global batch was 32" in line and "16" in line
    # other data of the same shape
    r = train(out, "--epochs", "3", "--resume", "auto", "--seed", "5")
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = errors(r)
    assert "other data" in line
    assert snapshot(out) == before

    # a checkpoint of another run dropped into this run's checkpoints/ (newer step)
    other = tmp_path / "other"
    r = train(other, "--epochs", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    foreign = checkpoint.list_checkpoints(str(other))[-1]
    os.link(foreign, out / "checkpoints" / os.path.basename(foreign))
    r = train(out, "--epochs", "4", "--resume", "auto")
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = errors(r)
    other_id = json.loads((other / "run.json").read_text())["run_id"]
    assert f"belongs to run {other_id}" in line


def test_resume_under_settings_its_checkpoint_cannot_continue_under_exits_2(finished):
    """Another --optimizer (its state means nothing to another) or --freeze (other parameter
    groups): one line naming the flag and the checkpoint's setting, checked before anything
    is loaded; OUT untouched and its lock released."""
    out = finished
    before = snapshot(out)
    r = train(out, "--epochs", "3", "--resume", "auto", "--optimizer", "adamw")
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = errors(r)
    newest = checkpoint.list_checkpoints(str(out))[-1]
    assert line.startswith(f"hpcaccel: error: --optimizer adamw: the checkpoint {newest} was "
                           f"trained with --optimizer sgd"), line
    assert "failed" not in r.stderr and not (out / "run.lock").exists()
    r = train(out, "--epochs", "3", "--resume", "auto", "--freeze", "1")
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = errors(r)
    assert line.startswith(f"hpcaccel: error: --freeze: the checkpoint {newest} was trained "
                           f"with 6 trainable parameter tensors, this start has 4"), line
    assert snapshot(out) == before


def test_output_paths_are_checked_before_out_is_claimed(tmp_path):
    """An --out that is a file or cannot be created, a --timeline in no directory: one line
    naming the flag, exit 2, nothing written."""
    (tmp_path / "file").write_text("not a directory")
    for args, needle in [
            (["--out", str(tmp_path / "file")], f"--out {tmp_path / 'file'}: exists and is not a "
                                                f"directory"),
            (["--out", "/proc/hpcaccel-x"], "--out /proc/hpcaccel-x: cannot create it"),
            (["--out", str(tmp_path / "run"), "--timeline", "/nonexistent/x.json"],
             "--timeline /nonexistent/x.json: no such directory /nonexistent")]:
        r = train_cli(NP, *SMALL, "--epochs", "1", *args, timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        (line,) = errors(r)
        assert line.startswith(f"hpcaccel: error: {needle}"), line
        assert "set-up failed" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_timeline_inside_out_moves_aside_with_the_run(tmp_path):
    """The corrected command of a bad --timeline runs (nothing was claimed); an --overwrite
    start moves the trace with the run's other outputs."""
    out = tmp_path / "run"
    r = train(out, "--epochs", "1", "--timeline", "/nonexistent/x.json")
    assert r.returncode == 2 and not out.exists(), r.stdout + r.stderr
    r = train(out, "--epochs", "1", "--timeline", str(out / "trace.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    trace = (out / "trace.json").read_bytes()
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    r = train(out, "--epochs", "1", "--overwrite", "true")  # run.json knows the trace
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "previous" / run_id / "trace.json").read_bytes() == trace
    assert not (out / "trace.json").exists()


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    """An explicit --resume of an earlier checkpoint continues from there: its first new
    checkpoint (a lower step than the abandoned ones) is kept, and later ones go, so
    --resume auto continues this continuation."""
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (88, 132):
        checkpoint.save(str(tmp_path), checkpoint.build(model, opt, 0, 0, step, []), keep=2)
    path = checkpoint.save(str(tmp_path), checkpoint.build(model, opt, 0, 0, 44, []), keep=2)
    assert checkpoint.list_checkpoints(str(tmp_path)) == [path]
    for step in (88, 132, 176):
        newest = checkpoint.save(str(tmp_path), checkpoint.build(model, opt, 0, 0, step, []), keep=2)
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))] == [
        "step-00000132.pt", "step-00000176.pt"] and newest.endswith("176.pt")


def test_second_run_while_one_runs_exits_2_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    cmd = mpirun_command(NP, "-m", "hpcaccel.train", "--progress", "false", "--data",
                         "synthetic", "--synthetic-samples", "65536", "--synthetic-shape", "64",
                         "--model", "mlp", "--epochs", "50", "--out", str(out))
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines, deadline = [], time.time() + 180
        for line in first.stdout:
            lines.append(line)
            if line.startswith(f"hpcaccel: {NP} ranks"):
                break
            assert time.time() < deadline, "".join(lines)
        holder = json.loads((out / "run.lock").read_text())
        ranks = subprocess.run(["pgrep", "-P", str(first.pid)], capture_output=True,
                               text=True).stdout.split()
        assert str(holder["pid"]) in ranks
        r = train(out, "--epochs", "1", "--resume", "auto")
        assert r.returncode == 2, r.stdout + r.stderr
        (line,) = errors(r)
        assert f"host {socket.gethostname()}, pid {holder['pid']}" in line and "in use" in line
    finally:
        first.send_signal(signal.SIGUSR1)  # stops after a checkpoint, exit 3
        rest, _ = first.communicate(timeout=120)
    assert first.returncode == 3, "".join(lines) + rest
    assert not (out / "run.lock").exists()  # released on exit


FAILING_MODEL = """
import math, os
import torch

class Failing(torch.nn.Module):
    def __init__(self, shape, out):
        super().__init__()
        self.linear = torch.nn.Linear(math.prod(shape), out if isinstance(out, int) else math.prod(out))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3 and os.environ.get("OMPI_COMM_WORLD_RANK") == "0":
            raise RuntimeError("failing on purpose")
        return self.linear(x.flatten(1))

def failing(shape, out):
    return Failing(shape, out)
"""


def test_rank_0_failing_in_training_releases_the_lock_before_mpi_abort(tmp_path):
    (tmp_path / "failingmodel.py").write_text(FAILING_MODEL)
    out = tmp_path / "run"
    r = train(out, "--epochs", "1", "--model", "failingmodel:failing",
              env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode != 0 and "rank 0 failed: RuntimeError: failing on purpose" in r.stderr
    assert (out / "run.json").exists() and not (out / "run.lock").exists()


def test_stale_locks_are_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / "run.lock"
    # a crashed run on this host: its pid is gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    r = train(out, "--epochs", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"took over the lock of a run that is gone (host {socket.gethostname()}, " \
           f"pid {dead.pid}: no such process)" in r.stdout
    assert not lock.exists()

    # a run on another host with a recent heartbeat: still running as far as we can tell
    lock.write_text(json.dumps({"host": "node-elsewhere", "pid": 4242}))
    r = train(out, "--epochs", "2", "--resume", "auto")
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = errors(r)
    assert "host node-elsewhere, pid 4242, heartbeat" in line
    # ... whose heartbeat stopped long ago: taken over
    old = time.time() - 3600
    os.utime(lock, (old, old))
    r = train(out, "--epochs", "2", "--resume", "auto", env={"HPCACCEL_LOCK_STALE_S": "600"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"took over the lock .*host node-elsewhere, pid 4242, heartbeat \d+ s ago: "
                     r"no heartbeat for more than 600 s", r.stdout), r.stdout


def _integer_h5(path):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["x"] = rng.integers(0, 256, (256, 16)).astype(np.uint8)
        f["y"] = rng.integers(1, 5, 256)


def test_startup_warnings_integer_x_labels_from_1_and_the_other_backends_flag(tmp_path):
    data = tmp_path / "int.h5"
    _integer_h5(data)
    r = train_cli(NP, "--data", str(data), "--model", "mlp", "--epochs", "1", "--backend", "mpi",
                  "--fusion-mb", "4", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [l for l in r.stderr.splitlines() if l.startswith("hpcaccel: warning:")]
    assert len(warnings) == 3, r.stderr
    assert "whole numbers from 0 to 255" in warnings[0] and "pack --normalize" in warnings[0]
    assert "no sample has label 0" in warnings[1] and "5 outputs" in warnings[1]
    assert "--fusion-mb 4.0 is for the horovod backend only" in warnings[2]
    # clean data and flags: no warnings
    r = train(tmp_path / "clean", "--epochs", "1", "--backend", "mpi", "--bucket-mb", "4")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


@requires_horovod
def test_bucket_mb_with_horovod_warns(tmp_path):
    r = train(tmp_path / "run", "--epochs", "1", "--backend", "horovod", "--bucket-mb", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [l for l in r.stderr.splitlines() if l.startswith("hpcaccel: warning:")]
    assert warnings == ["hpcaccel: warning: --bucket-mb 4 is for the mpi backend only and does "
                        "nothing with the horovod backend (add --backend mpi, or drop it)"]
