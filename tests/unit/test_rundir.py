"""rundir's decisions on real directories, in one process (the CLI tests at 2 ranks are in
tests/integration/test_run_ownership.py)."""
import json
import os
import socket

import pytest
import torch

from hpcaccel import checkpoint, rundir
from hpcaccel.errors import UsageError

FP = [["w", [2, 2]]]
MINE = {"model": rundir.model_digest(FP), "global_batch": 32, "epochs": 2,
        "data": {"samples": 256, "sample_shape": [16], "classes": 10, "head": "abc"}}


def claim(out, resume="auto", overwrite=False, mine=MINE):
    c = rundir.claim(str(out), resume, overwrite, mine, FP, info=lambda line: None)
    c.release()
    return c


def test_a_run_that_ended_before_its_first_checkpoint_starts_again_under_its_id(tmp_path):
    first = claim(tmp_path, "none")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')  # then it crashed
    again = claim(tmp_path, "auto", mine=dict(MINE, epochs=3))
    assert again.run_id == first.run_id and again.checkpoint is None and not again.complete
    assert rundir.read_record(str(tmp_path))["epochs"] == 3


def test_a_finished_run_without_checkpoints_is_refused(tmp_path):
    claim(tmp_path, "none")
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(UsageError, match="finished but its checkpoints are gone"):
        claim(tmp_path)
    assert not (tmp_path / rundir.LOCK).exists()  # a refusal releases the lock


@pytest.mark.parametrize("change,needle", [
    ({"global_batch": 64}, "global batch was 32, this run's is 64"),
    ({"model": "other"}, "different model"),
    ({"data": dict(MINE["data"], classes=5)}, "other data (classes 10, this data's 5)"),
])
def test_mismatch_names_what_differs(change, needle):
    assert needle in rundir.mismatch(MINE, dict(MINE, **change))
    assert rundir.mismatch(MINE, dict(MINE, epochs=9)) is None  # more epochs: an extension


def test_a_live_lock_is_refused_naming_host_and_pid(tmp_path):
    held = rundir.Lock.acquire(str(tmp_path), info=lambda line: None)
    try:
        with pytest.raises(UsageError) as e:
            rundir.Lock.acquire(str(tmp_path), info=lambda line: None)
        assert f"host {socket.gethostname()}, pid {os.getpid()}, heartbeat" in str(e.value)
    finally:
        held.release()
    assert not (tmp_path / rundir.LOCK).exists()


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path):
    """The holder's pid now belongs to another process (its start time differs)."""
    (tmp_path / rundir.LOCK).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": "1"}))
    said = []
    lock = rundir.Lock.acquire(str(tmp_path), info=said.append)
    lock.release()
    assert said and "took over the lock" in said[0]


def test_resume_path_of_another_run_into_a_used_out_is_refused(tmp_path):
    model = torch.nn.Linear(2, 2, bias=False)
    fp = checkpoint.fingerprint(model)
    mine = dict(MINE, model=rundir.model_digest(fp))
    a, b = tmp_path / "a", tmp_path / "b"
    rundir.claim(str(a), "none", False, mine, fp, info=lambda line: None).release()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = checkpoint.save(str(a), checkpoint.build(model, opt, 1, 0, 8, []), keep=2)
    rundir.claim(str(b), "none", False, mine, fp, info=lambda line: None).release()
    with pytest.raises(UsageError, match="another run than the checkpoint's"):
        rundir.claim(str(b), path, False, mine, fp, info=lambda line: None)
    c = rundir.claim(str(tmp_path / "c"), path, False, mine, fp, info=lambda line: None)
    c.release()  # an empty --out continues the checkpoint's run
    assert c.checkpoint == path
    assert c.run_id == rundir.read_record(str(a))["run_id"] == rundir.read_record(str(tmp_path / "c"))["run_id"]


def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock(tmp_path, monkeypatch):
    """The earlier run may have died with its node; the requeued job starts elsewhere at once."""
    (tmp_path / rundir.LOCK).write_text(json.dumps(
        {"host": "node-gone", "pid": 4242, "slurm_job": "77", "slurm_restart": "0"}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same run of the job: still held
    with pytest.raises(UsageError, match="host node-gone, pid 4242"):
        rundir.Lock.acquire(str(tmp_path), info=lambda line: None)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    said = []
    rundir.Lock.acquire(str(tmp_path), info=said.append).release()
    assert "an earlier run of this Slurm job 77 (restart 0, now 1)" in said[0]
