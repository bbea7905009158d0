"""The defaults a user sees through the CLI: --backend auto on CPU and --progress auto.

Through subprocess pipes stderr is not a terminal, as in a Slurm log."""
import os
import subprocess
import sys

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


def test_progress_true_still_draws_the_bar_in_a_pipe(tmp_path):
    r = run_bytes([sys.executable, "-m", "hpcaccel.train", "--out", str(tmp_path / "run"),
                   "--model", "mlp", "--epochs", "1", "--progress", "true"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert b"\r" in r.stderr and b"it/s" in r.stderr
