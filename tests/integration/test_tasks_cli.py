"""Tasks through `python -m hpcaccel.train` under real mpirun: regression recovers the weights
of linear data (two outputs), a task of the test's own, segmentation with the built-in
per-pixel model, the built-in diabetes data, requeue of a regression bit for bit, and a
model whose output does not fit the task as one line with exit 2."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hpcaccel.data import write_file
from support import assert_same_model, mpirun_command, train_cli

WEIGHTS = np.array([[1.5, -2.0, 0.5, 0.0], [0.25, 1.0, -1.0, 3.0]])  # 2 outputs x 4 inputs
BIAS = np.array([0.5, -1.0])

# The test's own model and task, imported by every rank (PYTHONPATH=tmp_path).
OWN_CODE = '''
import math

import torch


def linear(input_shape, output_shape):
    """One linear layer: its weights are the regression's."""
    return torch.nn.Sequential(torch.nn.Flatten(),
                               torch.nn.Linear(math.prod(input_shape), math.prod(output_shape)))


def normalised(input_shape, output_shape):
    """An MLP with BatchNorm: running statistics each rank updates from its own samples."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), 64),
                               torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                               torch.nn.Linear(64, math.prod(output_shape)))


def unsummed(target):
    """A metric per sample, never summed over the batch: fails the first-batch check."""
    def loss(out, y):
        return (out - y).abs().mean()
    return loss, {"error": lambda out, y: (out - y).abs().sum(1)}


def classifier(input_shape, output_shape):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), 10))


def close_enough(target):
    """Absolute-error loss; metrics: the share of outputs within 0.5 of the target, and the
    error's sign (below, above) per output: sums over the batch."""
    def loss(out, y):
        return (out - y).abs().mean()

    def within_half(out, y):
        return ((out - y).abs() < 0.5).float().mean(dim=1).sum()

    def above(out, y):
        return (out > y).float().sum(dim=0)
    return loss, {"within_half": within_half, "above": above}
'''


def linear_data(tmp_path, n, seed, name, noise=0.0, features=4):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    w = WEIGHTS if features == 4 else np.random.default_rng(7).standard_normal((2, features)) / 4
    y = (x @ w.T + BIAS + noise * rng.standard_normal((n, 2))).astype(np.float32)
    path = str(tmp_path / name)
    write_file(path, [x], [y], n, (features,), 0, "linear")
    return path


@pytest.fixture
def own(tmp_path):
    (tmp_path / "own_code.py").write_text(OWN_CODE)
    return {"PYTHONPATH": str(tmp_path)}


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


def test_regression_recovers_the_weights_of_linear_data_with_two_outputs(tmp_path, own):
    train = linear_data(tmp_path, 1024, 1, "train.h5")
    test = linear_data(tmp_path, 200, 2, "test.h5")
    out = tmp_path / "run"
    r = train_cli(2, "--data", train, "--test-data", test, "--model", "own_code:linear",
                  "--epochs", "6", "--lr", "0.05", "--out", str(out), env=own)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "task regress (2 outputs, loss mse), chosen by --task auto from y's float targets" in r.stdout
    assert "done: test rmse" in r.stdout and "test r2" in r.stdout
    model = torch.load(out / "model.pt", weights_only=True)
    np.testing.assert_allclose(model["1.weight"].numpy(), WEIGHTS, atol=2e-3)
    np.testing.assert_allclose(model["1.bias"].numpy(), BIAS, atol=2e-3)
    summary = summary_of(out)
    assert summary["task"] == "regress" and summary["test_accuracy"] is None
    assert summary["test_rmse"] < 1e-2 and summary["test_r2"] > 0.9999
    assert len(summary["test_r2_per_output"]) == 2 and min(summary["test_r2_per_output"]) > 0.9999
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and records[-1]["train_r2"] > 0.999
    assert {"train_rmse", "train_mae", "test_mae", "test_rmse_per_output"} <= set(records[-1])


def test_a_task_of_our_own(tmp_path, own):
    train = linear_data(tmp_path, 512, 1, "train.h5", noise=0.3)
    test = linear_data(tmp_path, 64, 2, "test.h5", noise=0.3)
    out = tmp_path / "run"
    r = train_cli(2, "--data", train, "--test-data", test, "--task", "own_code:close_enough",
                  "--model", "mlp", "--epochs", "3", "--out", str(out), env=own)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "task close_enough" in r.stdout and "test within_half" in r.stdout
    summary = summary_of(out)
    assert summary["task"] == "close_enough" and summary["test_within_half"] > 0.5
    assert len(summary["test_above"]) == 2 and 0 <= min(summary["test_above"]) <= 1
    assert 0 < summary["test_loss"] < 1  # the factory's loss, averaged per sample


def test_segmentation_with_the_built_in_per_pixel_model(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 1, 8, 8)).astype(np.float32)
    y = np.digitize(x[:, 0], [-0.4, 0.4])  # 3 classes per pixel, read off the pixel
    write_file(str(tmp_path / "seg.h5"), [x], [y], 256, (1, 8, 8), 3, "seg")
    out = tmp_path / "run"
    r = train_cli(2, "--data", str(tmp_path / "seg.h5"), "--test-data", str(tmp_path / "seg.h5"),
                  "--epochs", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "task segment (3 classes, 64 elements per sample), chosen by --task auto" in r.stdout
    assert "model fcn (auto)" in r.stdout
    summary = summary_of(out)
    assert summary["test_pixel_accuracy"] > 0.75 and summary["test_mean_iou"] > 0.55, summary
    assert len(summary["test_iou_per_class"]) == 3
    # the metrics reported are model.pt's (fcn has BatchNorm: its running statistics are
    # agreed across ranks before evaluating and saving), evaluated here by one process
    alone = evaluated_alone(out / "model.pt", str(tmp_path / "seg.h5"), "fcn")
    assert alone["mean_iou"] == summary["test_mean_iou"]
    assert alone["pixel_accuracy"] == summary["test_pixel_accuracy"]
    assert alone["loss"] == pytest.approx(summary["test_loss"], rel=1e-6, abs=0)


def evaluated_alone(model_path, test_path, model_name) -> dict:
    """The test metrics of a saved model evaluated by one process of its own (MPI stays out
    of the test process: tests/integration/conftest.py)."""
    code = f"""
import json, torch
from mpi4py import MPI
from hpcaccel import tasks
from hpcaccel.control import ControlPlane
from hpcaccel.data import open_dataset
from hpcaccel.models import build_model
from hpcaccel.trainer import evaluate
ds = open_dataset({str(test_path)!r})
task = tasks.resolve("auto", ds.target, "--test-data")
model = build_model({model_name!r}, ds.sample_shape, task.output_shape)
model.load_state_dict(torch.load({str(model_path)!r}, weights_only=True))
print(json.dumps(evaluate(model, ds, ControlPlane(MPI.COMM_SELF), 256, task=task)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_built_in_diabetes_regression(tmp_path):
    out = tmp_path / "run"
    r = train_cli(2, "--data", "diabetes", "--epochs", "20", "--lr", "0.005", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data 353 samples" in r.stdout and "model mlp (auto)" in r.stdout
    summary = summary_of(out)
    assert summary["task"] == "regress" and summary["test_r2"] > 0.3, summary


def test_a_model_whose_output_does_not_fit_is_one_line(tmp_path, own):
    """(A float y with --task classify: tests/integration/test_reliability.py; every other
    refusal of a task, one process: tests/unit/test_tasks.py.)"""
    data = linear_data(tmp_path, 64, 1, "train.h5")
    r = train_cli(2, "--data", data, "--out", str(tmp_path / "run"), "--model",
                  "own_code:classifier", env=own, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("hpcaccel: error:")]
    assert errors == ["hpcaccel: error: --model own_code:classifier: outputs shaped (10,) per "
                      "sample, the task needs (2,)"], r.stderr[-2000:]
    assert not (tmp_path / "run" / "run.json").exists()


def test_a_task_whose_metric_is_not_summed_is_one_line_before_training(tmp_path, own):
    """(Each way a factory's task can fail the first-batch check: tests/unit/test_tasks.py.)"""
    data = linear_data(tmp_path, 64, 1, "train.h5")
    r = train_cli(2, "--data", data, "--out", str(tmp_path / "run"), "--task",
                  "own_code:unsummed", "--model", "mlp", "--batch-size", "8", env=own,
                  timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("hpcaccel:")]
    assert errors == ["hpcaccel: error: --task own_code:unsummed: metric error returned shape "
                      "(8,) for a batch of 8 and (1,) for one sample; a metric returns the sum "
                      "over the batch of a per-sample quantity, of one shape whatever the "
                      "batch (e.g. .sum() or .sum(0))"], r.stderr[-2000:]


def test_regress_on_class_labels_warns_and_a_resume_keeps_the_loss(tmp_path):
    """--task regress on digits' labels: one warning from rank 0. Continuing the run with
    another --loss would change what train_loss means mid-file: refused in one line."""
    out = tmp_path / "run"
    r = train_cli(2, "--task", "regress", "--model", "mlp", "--epochs", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [l for l in r.stderr.splitlines() if l.startswith("hpcaccel: warning:")]
    assert warnings == ["hpcaccel: warning: --task regress on --data digits: y holds class "
                        "labels, 10 classes; regression treats the label numbers as quantities "
                        "(class 7 as more than class 3), which rarely learns and can diverge; "
                        "--task classify (or auto) learns the classes"], r.stderr[-2000:]
    r = train_cli(2, "--task", "regress", "--model", "mlp", "--epochs", "2", "--out", str(out),
                  "--resume", "auto", "--loss", "l1", timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("hpcaccel: error:")]
    assert len(errors) == 1 and errors[0].startswith("hpcaccel: error: --loss l1: the checkpoint "
                                                     ), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "was trained with --loss mse" in errors[0]


def run_until_signalled(cmd, after_line="epoch 1/", timeout=240, env=None):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if after_line in line:
            proc.send_signal(signal.SIGUSR1)  # forwarded by mpirun to every rank, as Slurm's warning
            break
        assert time.time() < deadline, "".join(lines)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(lines) + out


def test_requeued_regression_equals_an_uninterrupted_run(tmp_path, own):
    """With BatchNorm: the checkpoint cut mid-epoch keeps each rank's own running
    statistics, so the requeued run's evaluations are the uninterrupted run's too."""
    train = linear_data(tmp_path, 4096, 1, "train.h5", noise=0.5, features=16)
    test = linear_data(tmp_path, 256, 2, "test.h5", noise=0.5, features=16)
    args = ["-m", "hpcaccel.train", "--data", train, "--test-data", test, "--model",
            "own_code:normalised", "--epochs", "4", "--lr", "0.01", "--progress", "false"]
    full, part = tmp_path / "full", tmp_path / "part"
    env = {**os.environ, **own}
    r = subprocess.run(mpirun_command(2, *args, "--out", str(full)), capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rc, out = run_until_signalled(mpirun_command(2, *args, "--out", str(part)), env=env)
    assert rc == 3, out[-3000:]  # checkpointed mid-run: requeue
    r = subprocess.run(mpirun_command(2, *args, "--out", str(part), "--resume", "auto"),
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    assert_same_model(part / "model.pt", full / "model.pt")
    # every epoch's metrics too, the one cut in the middle included (its partial sums resumed)
    timing = {"epoch_seconds", "samples_per_second"}
    records = [[{k: v for k, v in json.loads(l).items() if k not in timing}
                for l in (d / "metrics.jsonl").read_text().splitlines()] for d in (part, full)]
    assert records[0] == records[1] and len(records[0]) == 4
    assert records[0][-1]["test_r2"] > 0.5
