"""No rank ever hangs: a crash, a SIGKILL, a hang, a NaN or a rank that ends early on one
rank ends every rank quickly with a clear message; bad data is one line and exit code 2."""
import json
import time

import h5py
import numpy as np
import pytest

from support import train_cli


# A user model that misbehaves on one rank at one step, chosen by environment variables.
FAULTY = '''
import os, time, torch
from mpi4py import MPI

class Faulty(torch.nn.Module):
    def __init__(self, shape, classes):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(shape[-1] * shape[-2] * shape[0], classes))
        self.calls = 0
    def forward(self, x):
        if self.training:
            self.calls += 1
        mine = MPI.COMM_WORLD.Get_rank() == int(os.environ["FAULT_RANK"])
        if mine and self.training and self.calls == int(os.environ["FAULT_STEP"]):
            kind = os.environ["FAULT"]
            if os.environ.get("FAULT_STAMP"):  # when the fault happened
                with open(os.environ["FAULT_STAMP"], "w") as f:
                    f.write(repr(time.time()))
            if kind == "raise":
                raise RuntimeError("user model exploded")
            if kind == "exit":  # this rank ends normally, mid-training
                raise SystemExit(0)
            if kind == "sigkill":
                os.kill(os.getpid(), 9)
            if kind == "hang":
                time.sleep(3600)
            if kind == "skip":  # this rank skips the step's next control collective (the vote)
                import numpy as np
                import hpcaccel.control as control
                issued = control.ControlPlane.allreduce
                def skipped(self, values, op="sum"):
                    control.ControlPlane.allreduce = issued  # only this one is skipped
                    return np.array(values, dtype=np.float64).reshape(-1)
                control.ControlPlane.allreduce = skipped
        out = self.net(x)
        if mine and os.environ["FAULT"] == "nan" and self.training and self.calls >= int(os.environ["FAULT_STEP"]):
            out = out * float("nan")
        return out

def faulty(shape, classes):
    return Faulty(shape, classes)
'''


@pytest.fixture(scope="module")
def faulty_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("faulty")
    (d / "faultymodel.py").write_text(FAULTY)
    return d


def train(np_, out, *args, env=None, timeout=120):
    """(result, seconds) of a 3-epoch run writing to `out`."""
    t0 = time.time()
    r = train_cli(np_, "--out", str(out), "--epochs", "3", *args, env=env, timeout=timeout)
    return r, time.time() - t0


def faulty_run(np_, tmp_path, faulty_dir, fault, rank, step=5, *extra):
    """(result, seconds from the fault to the end of the job): a promise about how fast a
    failure ends every rank is timed from the failure, so start-up on a loaded machine (4
    ranks on 2 busy cores can take longer than the promise) does not count against it."""
    stamp = tmp_path / "fault-time"
    env = {"PYTHONPATH": str(faulty_dir), "FAULT": fault, "FAULT_RANK": str(rank),
           "FAULT_STEP": str(step), "FAULT_STAMP": str(stamp)}
    r, _ = train(np_, tmp_path / "run", "--model", "faultymodel:faulty", *extra, env=env)
    ended = time.time()
    assert stamp.exists(), ("the fault never happened", r.stdout[-2000:], r.stderr[-2000:])
    return r, ended - float(stamp.read_text())


@pytest.mark.parametrize("np_", [2, 4])
def test_exception_on_one_rank_ends_all_within_30s(tmp_path, faulty_dir, np_):
    r, seconds = faulty_run(np_, tmp_path, faulty_dir, "raise", np_ - 1)
    assert r.returncode != 0 and seconds < 30, (seconds, r.stderr[-2000:])
    assert r.stderr.count(f"hpcaccel: rank {np_ - 1} failed: RuntimeError: user model exploded") == 1


@pytest.mark.parametrize("np_", [2, 4])
def test_sigkill_of_one_rank_ends_all_within_30s(tmp_path, faulty_dir, np_):
    r, seconds = faulty_run(np_, tmp_path, faulty_dir, "sigkill", 1)
    assert r.returncode != 0 and seconds < 30, (seconds, r.stderr[-2000:])


@pytest.mark.parametrize("np_", [2, 4])
def test_a_rank_that_ends_mid_training_ends_every_rank_naming_it(tmp_path, faulty_dir, np_):
    # sys.exit(0) in the last rank's forward at step 5: it ends normally (departure.py)
    # while the others wait in step 5's gradient exchange; before, until --stall-timeout
    r, seconds = faulty_run(np_, tmp_path, faulty_dir, "exit", np_ - 1)
    assert r.returncode != 0 and seconds < 30, (seconds, r.stderr[-2000:])
    assert (f"PeerLeft: rank {np_ - 1} left the job: hpcaccel.train ended on it, after 4 "
            f"gradients collective(s); this rank waits in gradients collective #5") in r.stderr


@pytest.mark.parametrize("np_", [2, 4])
def test_hung_rank_is_caught_by_the_stall_watchdog(tmp_path, faulty_dir, np_):
    r, seconds = faulty_run(np_, tmp_path, faulty_dir, "hang", 0, 5, "--stall-timeout", "5")
    assert r.returncode != 0 and seconds < 30, (seconds, r.stderr[-2000:])
    assert "no progress for" in r.stderr and "after step 4" in r.stderr


def test_nonfinite_loss_stops_every_rank_with_one_message(tmp_path, faulty_dir):
    r, seconds = faulty_run(2, tmp_path, faulty_dir, "nan", 1, 7)
    assert r.returncode == 1, r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("hpcaccel: error:")]
    assert len(errors) == 1 and "non-finite loss at step 7" in errors[0]


def test_nonfinite_loss_skip_mode_skips_on_every_rank(tmp_path, faulty_dir):
    # from step 7 on, rank 1's loss is NaN: every later step is skipped on both ranks
    r, _ = faulty_run(2, tmp_path, faulty_dir, "nan", 1, 7, "--nonfinite", "skip")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_steps"] == summary["steps"] - 6
    assert summary["test_accuracy"] is not None  # parameters stayed finite


@pytest.mark.parametrize("case,needle", [
    ("nan", "sample 100 contains NaN or inf"),
    ("label", "label 10 of sample 7 out of range [0, 10)"),
])
def test_bad_data_content_one_line_exit_2(tmp_path, case, needle):
    x = np.random.default_rng(0).standard_normal((256, 1, 4, 4)).astype(np.float32)
    y = np.arange(256) % 10
    if case == "nan":
        x[100, 0, 1, 1] = np.inf
    else:
        y[7] = 10
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"], f["y"] = x, y
        f.attrs["classes"] = 10
    r, _ = train(2, tmp_path / "run", "--data", str(tmp_path / "d.h5"))
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if l.startswith("hpcaccel: error:")]
    assert len(errors) == 1 and needle in errors[0] and str(tmp_path / "d.h5") in errors[0]
    assert not (tmp_path / "run").exists()


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v
    return str(path)


def _text(path, text):
    path.write_text(text)
    return str(path)


def _shards(tmp_path):
    from hpcaccel.data import write_file
    write_file(str(tmp_path / "a.h5"), [np.zeros((64, 2))], [np.zeros(64, int)], 64, (2,), 3, "t")
    write_file(str(tmp_path / "b.h5"), [np.zeros((64, 5))], [np.zeros(64, int)], 64, (5,), 3, "t")
    (tmp_path / "index.json").write_text(json.dumps({
        "format": "hpcaccel-shards", "version": 1,
        "files": [{"path": "a.h5", "samples": 64}, {"path": "b.h5", "samples": 64}]}))
    return str(tmp_path / "index.json")


# Bad data files and flags, as the user meets them: through the CLI, at 2 ranks.
@pytest.mark.parametrize("make_args,needle", [
    (lambda d: ["--data", str(d)], "is a directory, not a file"),
    (lambda d: ["--data", _text(d / "t.h5", "hello")], "not an HDF5 file"),
    (lambda d: ["--data", _h5(d / "t.h5", x=np.zeros((64, 2)))], "no dataset 'y'"),
    (lambda d: ["--data", _h5(d / "t.h5", x=np.zeros((64, 2)), y=np.zeros(65, int))],
     "x has 64 samples but y has 65"),
    (lambda d: ["--data", _h5(d / "t.h5", x=np.zeros((64, 2)), y=np.zeros(64)), "--task", "classify"],
     "--task classify needs one integer class label per sample"),
    (lambda d: ["--data", _h5(d / "t.h5", x=np.array([b"a"] * 64), y=np.zeros(64, int))], "x must be"),
    (lambda d: ["--data", _h5(d / "t.h5", x=np.zeros((0, 2)), y=np.zeros(0, int))], "empty"),
    (lambda d: ["--data", _shards(d)], "differ"),
    (lambda d: ["--batch-size", "0"], "--batch-size must be positive"),
    (lambda d: ["--backend", "nccl"], "--backend: invalid choice"),
], ids=["directory", "not-hdf5", "no-y", "length-mismatch", "float-labels", "bytes-x", "empty",
        "inconsistent-shards", "zero-batch", "unknown-backend"])
def test_bad_input_through_the_cli_one_line_exit_2(tmp_path, make_args, needle):
    data = tmp_path / "data"
    data.mkdir()
    args = make_args(data)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("earlier run\n")
    r, _ = train(2, out, *args, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("hpcaccel: error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]
    assert (out / "metrics.jsonl").read_text() == "earlier run\n"  # nothing overwritten
