"""The defaults a user sees through the CLI: --backend auto on CPU and --progress auto.

Through subprocess pipes stderr is not a terminal, as in a Slurm log."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from support import ROOT, mpirun_command


def run_bytes(cmd, timeout=300):
    """Output as bytes: text mode would turn the bar's carriage returns into newlines."""
    return subprocess.run(cmd, capture_output=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1",
                               "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})

NP = 2


def test_defaults_in_a_pipe_give_plain_epoch_lines_and_the_mpi_reducer_with_its_reason(tmp_path):
    r = run_bytes(mpirun_command(NP, "-m", "hpcaccel.train", "--out", str(tmp_path / "run"),
                                 "--model", "mlp", "--epochs", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert b"\r" not in r.stderr and b"\r" not in r.stdout  # no progress-bar fragments
    assert b"it/s" not in r.stderr
    stdout = r.stdout.decode()
    epochs = [l for l in stdout.splitlines() if l.startswith("epoch ")]
    assert [l.split()[1] for l in epochs] == ["1/2", "2/2"]  # one plain line per epoch
    (start,) = [l for l in stdout.splitlines() if l.startswith(f"hpcaccel: {NP} ranks")]
    assert "backend mpi" in start and "auto: CPU training" in start
    assert "optimizer sgd, lr 0.05 (sgd's default; --lr sets another)" in start


def test_progress_true_still_draws_the_bar_in_a_pipe(tmp_path):
    """(With --optimizer adamw and no --lr: AdamW's own lr, said and recorded.)"""
    r = run_bytes([sys.executable, "-m", "hpcaccel.train", "--out", str(tmp_path / "run"),
                   "--model", "mlp", "--epochs", "1", "--progress", "true",
                   "--optimizer", "adamw"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert b"\r" in r.stderr and b"it/s" in r.stderr
    assert "optimizer adamw, lr 0.001 (adamw's default" in r.stdout.decode()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["lr"] == 0.001 and summary["config"]["optimizer"] == "adamw"


def in_a_terminal(command: str, timeout=300):
    """`command` (a shell line) run as if typed in a terminal: util-linux `script` gives it a
    pseudo-terminal as stdin, stdout and stderr. What the terminal showed, as bytes."""
    env = {k: v for k, v in os.environ.items() if k != "HPCACCEL_TERMINAL"}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl=env.get("OMPI_MCA_btl", "self,vader,tcp"))
    return subprocess.run(["script", "-qec", command, "/dev/null"], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout, cwd=ROOT, env=env)


def orte_mpirun() -> str | None:
    """The mpirun scripts/mpirun.sh would run, where it is Open MPI 4 or older (ORTE names
    mpirun's process to its ranks; Open MPI 5's PRRTE is not recognised), else None."""
    venv = os.path.join(ROOT, ".venv", "bin", "mpirun")
    mpirun = venv if os.access(venv, os.X_OK) else shutil.which("mpirun")
    version = subprocess.run([mpirun or "false", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"Open MPI\)? (\d+)\.", version)
    return mpirun if match and int(match.group(1)) <= 4 else None


SHORT = ["-m", "hpcaccel.train", "--model", "mlp", "--epochs", "1"]


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux script (a pty)")
@pytest.mark.parametrize("launcher", ["scripts/mpirun.sh", "mpirun"])
def test_progress_auto_draws_the_bar_under_mpirun_in_a_terminal(tmp_path, launcher):
    """mpirun gives each rank a pipe, yet the user watches a terminal: scripts/mpirun.sh says
    so (HPCACCEL_TERMINAL), and a plain Open MPI mpirun is found through its own stderr."""
    if launcher == "mpirun":
        mpirun = orte_mpirun()
        if mpirun is None:
            pytest.skip("plain mpirun is recognised for Open MPI 4 and older only")
        cmd = [mpirun, "-np", str(NP), sys.executable, *SHORT]
    else:
        cmd = mpirun_command(NP, *SHORT)
    r = in_a_terminal(shlex.join([*cmd, "--out", str(tmp_path / "run")]))
    assert r.returncode == 0, r.stdout[-3000:]
    assert b"\r" in r.stdout and b"it/s" in r.stdout, r.stdout[-3000:]  # tqdm's bar
    assert r.stdout.count(b"it/s]") < 200  # rank 0's bar only, redrawn at most every 0.5 s


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux script (a pty)")
def test_progress_auto_keeps_plain_lines_when_mpiruns_stderr_is_a_file(tmp_path):
    """In a terminal, but mpirun's stderr (where the bar would go) goes to a file: no bar there
    or on the terminal, the epoch lines on the terminal as usual."""
    mpirun = orte_mpirun()
    if mpirun is None:
        pytest.skip("plain mpirun is recognised for Open MPI 4 and older only")
    err = tmp_path / "err.log"
    r = in_a_terminal(shlex.join([mpirun, "-np", str(NP), sys.executable, *SHORT,
                                  "--out", str(tmp_path / "run")]) + f" 2>{shlex.quote(str(err))}")
    assert r.returncode == 0, err.read_text()[-3000:]
    assert b"it/s" not in r.stdout and b"it/s" not in err.read_bytes()
    assert b"\r" not in err.read_bytes()
    assert b"epoch 1/1" in r.stdout
