"""`python -m hpcaccel.doctor` under real mpirun: a healthy set-up passes (exit 0) at 2 and
4 ranks; an oversubscribed layout, a missing --data and an unwritable --out each get their
verdict (exit 1); an --out training would refuse (another run's outputs, a live run's lock)
is a problem, training's built-in --data is not; bad usage is one line and exit 2; a
launcher/MPI size mismatch is found."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from hpcaccel.data import write_file
from support import mpirun_python, train_cli


def doctor(np_, *args, env=None):
    return mpirun_python(np_, "-m", "hpcaccel.doctor", *args, timeout=180, env=env)


def problem_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("PROBLEM:")]


@pytest.fixture
def data(tmp_path):
    path = str(tmp_path / "d.h5")
    write_file(path, [np.zeros((64, 4), np.float32)], [np.arange(64) % 3], 64, (4,), 3, "test")
    return path


@pytest.mark.parametrize("np_", [2, 4])
def test_healthy_setup_passes(np_, data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    r = doctor(np_, "--data", data, "--out", str(out), "--grad-mb", "10", "--compute-ms", "50")
    assert r.returncode == 0, r.stdout + r.stderr
    table = r.stdout.split("\n\n")[1].splitlines()
    assert [line.split()[1] for line in table[1:]] == [str(k) for k in range(np_)]
    assert f"{np_} rank(s) on 1 host(s)" in r.stdout
    assert "64 samples, seen alike by every rank" in r.stdout
    assert "every host sees it" in r.stdout
    assert f"world ({np_} ranks): latency" in r.stdout
    assert "| 1024 |" in r.stdout  # the cost-model prediction for --grad-mb/--compute-ms
    assert problem_lines(r.stdout) == [] and "ready to train" in r.stdout
    # the doctor's probe file is gone, what was there is untouched
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "earlier results"


def test_problems_get_verdicts_and_exit_1(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    r = doctor(4, "--threads", "2", "--data", str(tmp_path / "missing.h5"),
               "--out", str(not_a_dir / "out"))
    assert r.returncode == 1, r.stdout + r.stderr
    problems = problem_lines(r.stdout)
    assert len(problems) == 3, r.stdout
    assert any("8 threads on" in p and "oversubscribed" in p for p in problems)
    assert any("missing.h5: no such file (on every rank)" in p for p in problems)
    assert any("rank 0 cannot write there" in p for p in problems)
    assert not_a_dir.read_text() == "x"
    assert "3 problem(s)" in r.stdout


def test_bad_usage_is_one_line_and_exit_2():
    r = doctor(2, "--grad-mb", "10")
    assert r.returncode == 2
    ours = [line for line in r.stderr.splitlines() if line.startswith("hpcaccel.doctor")]
    assert ours == ["hpcaccel.doctor: error: --grad-mb and --compute-ms go together"]
    assert "hpcaccel doctor:" not in r.stdout


def test_ranks_started_without_mpi_connection_are_reported():
    # what each task of `srun` without PMIx sees: MPI's world of one, the launcher's of 3
    r = subprocess.run([sys.executable, "-m", "hpcaccel.doctor"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "SLURM_STEP_NUM_TASKS": "3",
                                                    "SLURM_STEP_ID": "0"})
    assert r.returncode == 1, r.stdout + r.stderr
    (p,) = problem_lines(r.stdout)
    assert "MPI reports 1 rank(s) but srun" in p and "--mpi=pmix" in p


def test_out_is_judged_by_trains_own_ownership_and_lock_rules(tmp_path):
    out = tmp_path / "run"
    small = ["--data", "synthetic", "--synthetic-samples", "256", "--synthetic-shape", "16",
             "--model", "mlp", "--epochs", "1", "--out", str(out)]
    r = train_cli(2, *small)
    assert r.returncode == 0, r.stderr[-2000:]
    # a finished run: train's default --resume none refuses it, and so does the doctor
    d = doctor(2, "--out", str(out))
    assert d.returncode == 1, d.stdout + d.stderr
    (p,) = problem_lines(d.stdout)
    t = train_cli(2, *small)
    assert t.returncode == 2, t.stdout + t.stderr
    (refused,) = [l for l in t.stderr.splitlines() if l.startswith("hpcaccel: error:")]
    assert p == ("PROBLEM: hpcaccel.train --resume none --overwrite false would stop with exit "
                 "2: " + refused[len("hpcaccel: error: "):])
    # with the flags that continue it: ready
    d = doctor(2, "--out", str(out), "--resume", "auto")
    assert d.returncode == 0 and "ready to train" in d.stdout, d.stdout + d.stderr
    # a live run holds the lock (this test's own process stands for it)
    (out / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    d = doctor(2, "--out", str(out), "--resume", "auto", "--overwrite", "true")
    assert d.returncode == 1, d.stdout + d.stderr
    (p,) = problem_lines(d.stdout)
    assert f"in use by a running hpcaccel run (host {socket.gethostname()}, pid {os.getpid()}" in p
    assert (out / "run.lock").exists()  # the doctor never takes or breaks a lock


def test_builtin_data_is_valid(tmp_path):
    r = doctor(2, "--data", "digits")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "data: digits: a built-in source" in r.stdout and problem_lines(r.stdout) == []
