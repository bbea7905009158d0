"""The scripts in examples/ as users run them, at 2 ranks under mpirun: the hpcaccel.torch
script (RankData, Job) trains; stopped by SIGTERM it checkpoints, and the same command
continues to exactly the parameters and metrics of an uninterrupted run; a rank that stalls
ends the job with a hang report naming it, one that skips a vote is an error on both ranks
naming what each was in; the plain Horovod script runs unchanged through
python -m hpcaccel.horovod. Every run is bounded by a timeout."""
import os
import re
import signal
import subprocess
import time

import pytest

from hpcaccel import checkpoint
from support import ROOT, assert_same_model, mpirun_command, mpirun_python

from test_checkpoint_resume import run_until_signalled, signal_ranks

# its tests share runs (module fixtures): one worker runs them all (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("script_examples")

EXAMPLE = os.path.join(ROOT, "examples", "hpcaccel_torch_script.py")
HOROVOD_EXAMPLE = os.path.join(ROOT, "examples", "horovod_script.py")
# digits: 1,437 samples / (2 ranks x 8) = 89 steps per epoch, long enough to signal mid-run
ARGS = ["--epochs", "4", "--batch-size", "8", "--lr", "0.02"]


def epoch_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(r"epoch \d+/\d+ ", line)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    r = mpirun_python(2, EXAMPLE, "--out", str(out), *ARGS, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return out, r.stdout


def test_example_trains_and_checkpoints_every_epoch(uninterrupted):
    out, stdout = uninterrupted
    lines = epoch_lines(stdout)
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    accuracy = float(lines[-1].rsplit(" ", 1)[1])
    assert accuracy > 0.8, lines  # digits: a few epochs reach 0.9 and more
    assert (out / "model.pt").exists() and (out / "run.json").exists()
    saved = checkpoint.list_checkpoints(str(out))
    assert len(saved) == 2 and saved[-1].endswith(f"step-{4 * 89:08d}.pt")  # keep=2
    head = checkpoint.header(saved[-1])
    assert (head["epoch"], head["step_in_epoch"]) == (4, 0)
    assert not (out / "run.lock").exists()  # released at the end


def test_sigterm_mid_run_checkpoints_and_the_same_command_continues_exactly(
        tmp_path, uninterrupted):
    full, full_stdout = uninterrupted
    out = tmp_path / "part"
    command = mpirun_command(2, EXAMPLE, "--out", str(out), *ARGS)
    # SIGTERM to every rank, as Slurm sends it at preemption or scancel
    rc, first = run_until_signalled(command, lambda p: signal_ranks(p.pid, signal.SIGTERM),
                                    after_line="epoch 1/", timeout=180)
    assert rc == 3, first[-3000:]  # checkpointed: requeue me
    stopped = re.search(r"stopped by SIGTERM after step (\d+); checkpoint (\S+);", first)
    assert stopped, first[-3000:]
    step = int(stopped.group(1))
    assert 89 <= step < 4 * 89 and stopped.group(2).endswith(f"step-{step:08d}.pt")
    assert not (out / "model.pt").exists()

    r = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"resuming from {stopped.group(2)}" in r.stdout
    # the partial epoch's loss sum came back with the checkpoint (Job.save's state), the
    # data position, the optimizer's momentum and every rank's RNG: the same epochs, the
    # same metrics, the same parameters to the bit
    assert epoch_lines(first) + epoch_lines(r.stdout) == epoch_lines(full_stdout)
    assert_same_model(out / "model.pt", full / "model.pt")


STALL = '''
import os, runpy, sys, time
import numpy as np
import hpcaccel.torch as hvd
from hpcaccel.torch.control_ops import EngineControlPlane as plane
from hpcaccel.torch.extras import Job

vote = Job.should_stop

def should_stop(self):
    if hvd.rank() == hvd.size() - 1 and self.global_step == 4:
        if os.environ["STALL"] == "hang":
            time.sleep(3600)  # stuck in the script's own code
        else:  # this rank skips the step's vote, goes on, and waits in the next collective
            issued = plane.allreduce
            def skipped(self, values, op="sum"):
                plane.allreduce = issued
                return np.array(values, dtype=np.float64).reshape(-1)
            plane.allreduce = skipped
    return vote(self)

Job.should_stop = should_stop
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def stalled_run(tmp_path, stall):
    (tmp_path / "stall.py").write_text(STALL)
    out = tmp_path / "run"
    t0 = time.time()
    r = mpirun_python(2, str(tmp_path / "stall.py"), EXAMPLE, "--out", str(out), *ARGS,
                      "--stall-timeout", "5", timeout=180, env={"STALL": stall})
    assert r.returncode not in (0, 3), r.stdout[-2000:] + r.stderr[-3000:]
    assert not (out / "run.lock").exists()  # released before the abort
    return r, out, time.time() - t0


def test_a_stalled_rank_ends_the_job_with_a_hang_report_naming_it(tmp_path):
    r, out, took = stalled_run(tmp_path, "hang")
    report = (out / "hang-report.txt").read_text()
    assert report.startswith("hpcaccel: hang report (2 of 2 ranks reported): rank(s) 1 to "
                             "blame"), report
    assert "hpcaccel: hang report" in r.stderr and "no progress for" in r.stderr
    assert "rank 1: training after step 4, in no collective" in report, report
    assert "rank 0: training after step 4, control in allreduce-max" in report, report
    assert took < 150


def test_a_rank_that_skips_a_vote_is_an_error_on_both_ranks_not_a_hang(tmp_path):
    # Rank 1 skips step 5's vote and goes on into step 6's gradient exchange; the vote and
    # the exchange are agreed on one engine, so both ranks fail at once, naming what each
    # was in (before, both waited for the stall timeout on two communicators).
    r, out, took = stalled_run(tmp_path, "skip")
    disagree = ("ranks disagree about a collective (all ranks must call the same operations "
                "in the same order, with the same names, dtypes, shapes, op and root): "
                "rank(s) 0: allreduce-max 'control' (1); rank(s) 1: gradient exchange "
                "'DistributedOptimizer #0'")
    assert r.stderr.count(disagree) == 2, r.stderr[-3000:]  # once from each rank
    assert not (out / "hang-report.txt").exists() and "no progress for" not in r.stderr
    assert took < 150


def test_horovod_script_runs_unchanged_through_the_launcher():
    r = mpirun_python(2, "-m", "hpcaccel.horovod", HOROVOD_EXAMPLE, "--epochs", "3",
                      timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    accuracy = [float(a) for a in re.findall(r"Test set: .* Accuracy: ([\d.]+)%", r.stdout)]
    assert len(accuracy) == 3 and accuracy[-1] > 30, r.stdout[-2000:]
