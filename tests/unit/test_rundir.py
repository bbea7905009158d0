"""rundir's decisions on real directories, in one process (the CLI tests at 2 ranks are in
tests/integration/test_run_ownership.py)."""
import json
import os
import socket

import pytest
import torch

from hpcaccel import checkpoint, rundir, runrecord
from hpcaccel.errors import UsageError

FP = [["w", [2, 2]]]
REQ = checkpoint.Requirements(FP)
MINE = {"model": rundir.model_digest(FP), "global_batch": 32, "epochs": 2,
        "data": {"samples": 256, "sample_shape": [16], "classes": 10, "head": "abc"}}


def claim(out, resume="auto", overwrite=False, mine=MINE):
    c = rundir.claim(str(out), resume, overwrite, mine, REQ, info=lambda line: None)
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
    fp = checkpoint.Requirements(checkpoint.fingerprint(model))
    mine = dict(MINE, model=rundir.model_digest(fp.fingerprint))
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


def finished_run(out):
    """A finished run's outputs: run.json, a checkpoint of its own, summary.json."""
    model = torch.nn.Linear(2, 2, bias=False)
    req = checkpoint.Requirements(checkpoint.fingerprint(model))
    mine = dict(MINE, model=rundir.model_digest(req.fingerprint))
    rundir.claim(str(out), "none", False, mine, req, info=lambda line: None).release()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = checkpoint.save(str(out), checkpoint.build(model, opt, 2, 0, 16, []), keep=2)
    (out / "summary.json").write_text("{}")
    return mine, req, path


def test_refusal_is_what_claim_refuses(tmp_path):
    """The doctor asks rundir.refusal; training's claim raises the same line."""
    mine, req, _ = finished_run(tmp_path)
    why = rundir.refusal(str(tmp_path), "none", False)
    assert why.startswith(f"--out {tmp_path}: holds the outputs of run ") and "--resume auto" in why
    with pytest.raises(UsageError) as e:
        rundir.claim(str(tmp_path), "none", False, mine, req, info=lambda line: None)
    assert str(e.value) == why
    assert rundir.refusal(str(tmp_path), "auto", False) is None  # continued or complete
    assert rundir.refusal(str(tmp_path), "none", True) is None  # moved aside
    assert rundir.refusal(str(tmp_path / "new"), "none", False) is None
    assert rundir.refusal(str(tmp_path), "/nonexistent.pt", False) == \
        "--resume /nonexistent.pt: no such file"


def test_refusal_names_a_live_lock(tmp_path):
    held = rundir.Lock.acquire(str(tmp_path), info=lambda line: None)
    try:
        why = rundir.refusal(str(tmp_path), "auto", True)
        assert f"in use by a running hpcaccel run (host {socket.gethostname()}, pid " \
               f"{os.getpid()}" in why
    finally:
        held.release()
    assert rundir.refusal(str(tmp_path), "auto", True) is None


def test_outputs_without_a_run_record_offer_only_what_works(tmp_path):
    """No --resume auto (it cannot tell whose they are): a new --out, where --resume of
    their checkpoint continues it, or --overwrite true."""
    out = tmp_path / "old"
    out.mkdir()
    mine, req, path = finished_run(out)
    (out / "run.json").unlink()
    for resume in ("none", "auto"):
        with pytest.raises(UsageError) as e:
            rundir.claim(str(out), resume, False, mine, req, info=lambda line: None)
        line = str(e.value)
        assert "no run.json" in line and "--resume auto" not in line, line
        assert f"use a new --out (with --resume {path} there" in line and "--overwrite true" in line
    c = rundir.claim(str(tmp_path / "new"), path, False, mine, req, info=lambda line: None)
    c.release()
    assert c.checkpoint == path
    c = rundir.claim(str(out), "none", True, mine, req, info=lambda line: None)
    c.release()
    assert c.checkpoint is None and rundir.read_record(str(out))["run_id"] == c.run_id


def test_overwrite_follows_a_resumed_checkpoint_that_moves_aside(tmp_path):
    """--resume OUT/checkpoints/X --overwrite true on outputs without run.json: they move to
    previous/, and the run continues from the checkpoint where it now lies."""
    mine, req, path = finished_run(tmp_path)
    os.unlink(tmp_path / "run.json")
    c = rundir.claim(str(tmp_path), path, True, mine, req, info=lambda line: None)
    c.release()
    assert c.checkpoint != path and os.path.exists(c.checkpoint)
    assert c.checkpoint.startswith(str(tmp_path / "previous")) and not os.path.exists(path)


def test_a_file_of_the_run_inside_out_moves_aside_with_the_rest(tmp_path):
    say = []
    c = rundir.claim(str(tmp_path), "none", False, MINE, REQ, info=say.append,
                     extra=["trace.json"])
    c.release()
    (tmp_path / "trace.json").write_text("[")
    assert rundir.read_record(str(tmp_path))["outputs"] == ["trace.json"]
    with pytest.raises(UsageError, match=r"\(run.json, trace.json\)"):
        rundir.claim(str(tmp_path), "none", False, MINE, REQ, info=say.append)
    rundir.claim(str(tmp_path), "none", True, MINE, REQ, info=say.append).release()
    assert (tmp_path / "previous" / c.run_id / "trace.json").read_text() == "["
    assert not (tmp_path / "trace.json").exists()


@pytest.mark.parametrize("make,flag,needle", [
    (lambda d: (d / "f", {}), "--out", "exists and is not a directory"),
    (lambda d: (d / "f" / "out", {}), "--out", f"is not a directory)"),
    (lambda d: (d / "out", {"--timeline": "/nonexistent/x.json"}), "--timeline",
     "no such directory /nonexistent"),
    (lambda d: (d / "out", {"--timeline": str(d)}), "--timeline", "is a directory"),
    (lambda d: (d / "out", {"--timeline": str(d / "out")}), "--timeline", "is a directory"),
    (lambda d: (d / "out", {"--timeline": str(d / "out" / "metrics.jsonl")}), "--timeline",
     "where the run keeps its own metrics.jsonl"),
])
def test_output_paths_are_checked_without_writing(tmp_path, make, flag, needle):
    (tmp_path / "f").write_text("a file")
    out, files = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UsageError) as e:
        rundir.check_paths(str(out), files)
    assert str(e.value).startswith(flag + " ") and needle in str(e.value), str(e.value)
    assert sorted(os.listdir(tmp_path)) == before


def test_output_paths_inside_an_out_still_to_be_created_are_fine(tmp_path):
    out = tmp_path / "a" / "b"
    rundir.check_paths(str(out), {"--timeline": str(out / "trace.json")})
    rundir.check_paths(str(out), {"--timeline": str(tmp_path / "trace.json"), "--x": None})
    assert os.listdir(tmp_path) == []


def elastic_run(out, world=2, batch=16, step_in_epoch=3):
    """A run of `world` ranks x `batch` with a mid-epoch checkpoint (one RNG state per rank)."""
    model = torch.nn.Linear(2, 2, bias=False)
    req = checkpoint.Requirements(checkpoint.fingerprint(model))
    mine = dict(MINE, model=rundir.model_digest(req.fingerprint), global_batch=world * batch)
    rundir.claim(str(out), "none", False, mine, req, info=lambda line: None,
                 layout=(world, batch, 1)).release()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = [torch.get_rng_state()] * world
    path = checkpoint.save(str(out), checkpoint.build(model, opt, 1, step_in_epoch, 11, rng), keep=2)
    return mine, req, path


def test_another_world_size_continues_with_the_checkpoints_global_batch(tmp_path):
    mine, req, path = elastic_run(tmp_path)
    assert rundir.read_record(str(tmp_path))["world_size"] == 2
    assert checkpoint.header(path)["world_size"] == 2
    flags = dict(mine, global_batch=16)  # 1 rank x --batch-size 16, as the flags say
    c = rundir.claim(str(tmp_path), "auto", False, flags, req, info=lambda line: None,
                     layout=(1, 16, 1))
    c.release()
    assert c.checkpoint == path
    plan = c.plan
    assert (plan.world_size, plan.batch_size, plan.accum_steps) == (1, 32, 2)
    assert (plan.epoch, plan.step_in_epoch, plan.sample_in_epoch) == (1, 3, 96)
    assert rundir.read_record(str(tmp_path))["global_batch"] == 32  # the run's, kept
    assert c.shared().plan == plan  # reaches every rank


def test_a_global_batch_the_new_ranks_cannot_split_is_refused_in_one_line(tmp_path):
    mine, req, path = elastic_run(tmp_path, world=3, batch=16)
    with pytest.raises(UsageError) as e:
        rundir.claim(str(tmp_path), "auto", False, dict(mine, global_batch=80), req,
                     info=lambda line: None, layout=(5, 16, 1))
    line = str(e.value)
    assert "\n" not in line and "its global batch 48 (3 x 16) cannot be kept on 5 ranks" in line
    assert "use a new --out, or --overwrite true" in line
    # the same world size with another --batch-size is refused as before
    with pytest.raises(UsageError, match="its global batch was 48, this run's is 96"):
        rundir.claim(str(tmp_path), "auto", False, dict(mine, global_batch=96), req,
                     info=lambda line: None, layout=(3, 32, 1))
    c = rundir.claim(str(tmp_path), "auto", True, dict(mine, global_batch=96), req,
                     info=lambda line: None, layout=(3, 32, 1))
    c.release()  # --overwrite: a new run
    assert c.checkpoint is None and c.plan is None


def test_restarts_and_steps_lost_are_counted_in_run_json(tmp_path):
    mine, req, path = elastic_run(tmp_path)
    run_id = rundir.read_record(str(tmp_path))["run_id"]
    runrecord.write_progress(str(tmp_path), {"run_id": run_id, "step": 18, "world_size": 2,
                                             "time": os.stat(path).st_mtime + 5})
    c = rundir.claim(str(tmp_path), "auto", False, mine, req, info=lambda line: None,
                     layout=(2, 16, 1))
    c.release()
    assert c.plan is None  # the same world size: the flags stand
    assert (c.restarts["restarts"], c.restarts["steps_lost"]) == (1, 18 - 11)
    last = c.restarts["last_restart"]
    assert (last["world_size_before"], last["checkpoint_step"], last["seconds_lost"]) == (2, 11, 5)
    c = rundir.claim(str(tmp_path), "auto", False, mine, req, info=lambda line: None)
    c.release()  # a requeue after a checkpoint at the last step reached: nothing lost
    record = rundir.read_record(str(tmp_path))
    assert (record["restarts"], record["steps_lost"]) == (2, 7 + 7)  # progress not updated here


def test_an_elastic_relaunch_takes_over_its_earlier_launchs_lock(tmp_path, monkeypatch):
    """The elastic batch script relaunches the step after it ended; its rank 0 may have been
    on the node that was lost (another host, a fresh heartbeat)."""
    (tmp_path / rundir.LOCK).write_text(json.dumps(
        {"host": "node-gone", "pid": 4242, "slurm_job": "77", "slurm_restart": "0",
         "slurm_launch": "1"}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.setenv("HPCACCEL_LAUNCH", "1")  # the same launch: still held
    with pytest.raises(UsageError, match="host node-gone, pid 4242"):
        rundir.Lock.acquire(str(tmp_path), info=lambda line: None)
    monkeypatch.setenv("HPCACCEL_LAUNCH", "2")
    said = []
    rundir.Lock.acquire(str(tmp_path), info=said.append).release()
    assert "an earlier launch of this Slurm job 77 (launch 1, now 2)" in said[0]
