"""Stop on a signal, checkpoint, resume: the result equals an uninterrupted run exactly."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hpcaccel import checkpoint
from support import assert_same_model, mpirun_command

# its tests share runs (module fixtures): one worker runs them all (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("checkpoint_resume")

# 4 epochs of 128 steps at 2 ranks (256 at 1): a stop signal sent at the first epoch's line
# lands with 3 epochs still to go
ARGS = ["--data", "synthetic", "--synthetic-samples", "4096", "--synthetic-shape", "64",
        "--model", "mlp", "--epochs", "4", "--batch-size", "16", "--progress", "false"]


def command(np_, *args):
    return mpirun_command(np_, "-m", "hpcaccel.train", *ARGS, *args)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    full = tmp_path_factory.mktemp("full")
    r = subprocess.run(command(2, "--out", str(full)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(full / "model.pt", weights_only=True)


def signal_ranks(mpirun_pid, sig, only_first=False):
    """Signal the rank processes themselves, as Slurm does at a time limit or preemption
    (mpirun forwards SIGUSR1, but on SIGTERM it also ends the job itself)."""
    ranks = subprocess.run(["pgrep", "-P", str(mpirun_pid)], capture_output=True, text=True).stdout.split()
    assert ranks, "no rank processes found"
    for pid in ranks[:1] if only_first else ranks:
        os.kill(int(pid), sig)


def run_until_signalled(cmd, deliver, after_line="epoch 1/", timeout=120):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if after_line in line:
            deliver(proc)
            break
        assert time.time() < deadline, "".join(lines)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(lines) + out


DELIVERIES = {
    # Slurm's warning before the time limit, forwarded by mpirun to every rank
    "usr1-via-mpirun": (signal.SIGUSR1, lambda p: p.send_signal(signal.SIGUSR1)),
    # preemption: SIGTERM to every rank
    "term-to-ranks": (signal.SIGTERM, lambda p: signal_ranks(p.pid, signal.SIGTERM)),
    # a signal that reaches only one rank: the ranks still stop together
    "usr1-to-one-rank": (signal.SIGUSR1, lambda p: signal_ranks(p.pid, signal.SIGUSR1, True)),
}


@pytest.mark.parametrize("how", list(DELIVERIES))
def test_resumed_run_equals_uninterrupted(tmp_path, how, uninterrupted):
    sig, deliver = DELIVERIES[how]
    part = tmp_path / "part"
    rc, out = run_until_signalled(command(2, "--out", str(part)), deliver)
    assert rc == 3, out  # REQUEUE_EXIT_CODE: checkpointed, please requeue
    assert f"stopped by {sig.name}" in out
    assert not (part / "model.pt").exists()
    saved = checkpoint.list_checkpoints(str(part))
    assert 1 <= len(saved) <= 2  # --keep-checkpoints 2

    r = subprocess.run(command(2, "--out", str(part), "--resume", "auto"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    assert_same_model(part / "model.pt", uninterrupted)
    epochs = [l for l in (part / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 4  # one record per epoch across both runs


def test_checkpoint_from_another_model_is_bad_input(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(command(2, "--out", str(out), "--epochs", "1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = checkpoint.list_checkpoints(str(out))[-1]
    r = subprocess.run(command(2, "--out", str(tmp_path / "other"), "--model", "cnn",
                               "--synthetic-shape", "1,8,8", "--resume", ckpt),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if l.startswith("hpcaccel: error:")]
    assert len(errors) == 1 and "different model" in errors[0] and ckpt in errors[0]


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path):
    """Kill a process in the middle of writing a checkpoint: the older one still loads."""
    model = torch.nn.Linear(1000, 1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    good = checkpoint.save(str(tmp_path), checkpoint.build(model, opt, 0, 1, 1, []), keep=2)
    script = (
        "import os, signal, torch, sys\n"
        "from hpcaccel import checkpoint, fsutil\n"
        "real = torch.save\n"
        "def dying_save(obj, fh):\n"
        "    fh.write(b'partial bytes of a checkpoint')\n"
        "    fh.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = dying_save\n"
        "m = torch.nn.Linear(1000, 1000); o = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        f"checkpoint.save({str(tmp_path)!r}, checkpoint.build(m, o, 0, 2, 2, []), keep=2)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL
    assert checkpoint.list_checkpoints(str(tmp_path)) == [good]
    state = checkpoint.load(good, checkpoint.Requirements(checkpoint.fingerprint(model)))
    assert state["global_step"] == 1


def test_stop_signals_while_exiting_do_not_kill_the_checkpointed_rank(tmp_path):
    """Slurm signals the ranks and the batch script forwards its own signal too, so more stop
    signals can arrive while a rank exits after its checkpoint. A stream of SIGUSR1 from
    the first epoch until the process is gone must still end with exit code 3."""
    import threading
    cmd = [sys.executable, "-m", "hpcaccel.train", *ARGS, "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def keep_signalling():
        while proc.poll() is None:
            try:
                proc.send_signal(signal.SIGUSR1)
            except ProcessLookupError:
                return
            time.sleep(0.005)

    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch 1/" in line:
            threading.Thread(target=keep_signalling, daemon=True).start()
            break
    out, _ = proc.communicate(timeout=120)
    text = "".join(lines) + out
    assert proc.returncode == 3, text[-3000:]
    assert "stopped by SIGUSR1" in text and checkpoint.list_checkpoints(str(tmp_path / "run"))
