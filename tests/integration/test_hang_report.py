"""The hang report names the rank that holds the job up (hpcaccel/hang_report.py)."""
import time

import pytest

from hpcaccel.hang_report import summarize
from support import BACKEND_PARAMS, train_cli

from test_reliability import FAULTY  # FAULT=hang sleeps in forward, FAULT=skip skips the vote


def state(rank, control_seq, grads_seq, control=None, grads=None, phase="training", step=4):
    def opened(kind, seq):
        return None if kind is None else {"seq": seq, "kind": kind, "step": step, "bytes": 8,
                                          "waiting_s": 5.0}
    return {"rank": rank, "phase": phase, "step": step,
            "seq": {"control": control_seq, "gradients": grads_seq},
            "open": {"control": opened(control, control_seq),
                     "gradients": opened(grads, grads_seq)}}


def test_rule_names_the_rank_outside_any_collective_and_the_missing_one():
    states = {0: state(0, 9, 5, grads="bucket allreduce"), 1: state(1, 9, 4),
              2: state(2, 9, 5, grads="bucket allreduce")}
    assert summarize(states, 3)[0] == [1]
    assert summarize(states, 4)[0] == [1, 3]  # rank 3 never reported


def test_rule_names_the_rank_that_skipped_a_collective():
    # rank 1 skipped control collective #10 (a barrier) and waits in the next bucket allreduce
    states = {0: state(0, 10, 5, control="barrier"),
              1: state(1, 9, 6, grads="bucket allreduce", step=5)}
    blamed, lines = summarize(states, 2)
    assert blamed == [1] and "skipped" in " ".join(lines)


def test_rule_blames_nobody_when_all_wait_in_the_same_collective():
    states = {r: state(r, 9, 5, grads="bucket allreduce") for r in range(2)}
    assert summarize(states, 2)[0] == []


def hang_run(tmp_path, np_, fault, rank, *extra):
    """(result, OUT/hang-report.txt) of a run in which `rank` does `fault` at step 5."""
    (tmp_path / "faultymodel.py").write_text(FAULTY)
    out = tmp_path / "run"
    t0 = time.time()
    r = train_cli(np_, "--out", str(out), "--epochs", "3", "--model", "faultymodel:faulty",
                  "--stall-timeout", "5", *extra, timeout=240,
                  env={"PYTHONPATH": str(tmp_path), "FAULT": fault, "FAULT_RANK": str(rank),
                       "FAULT_STEP": "5"})
    assert r.returncode != 0 and time.time() - t0 < 200, r.stderr[-3000:]
    assert "hpcaccel: hang report" in r.stderr
    assert sorted(p.name for p in (out / "hang-report").iterdir()) == \
        [f"rank-{i}.txt" for i in range(np_)]
    return r, (out / "hang-report.txt").read_text()


def blames(report, np_, rank):
    return report.startswith(f"hpcaccel: hang report ({np_} of {np_} ranks reported): "
                             f"rank(s) {rank} to blame")


@pytest.mark.parametrize("np_", [2, 3])
def test_rank_hanging_in_forward_is_named(tmp_path, np_):
    hung = np_ - 1
    r, report = hang_run(tmp_path, np_, "hang", hung)
    assert blames(report, np_, hung), report
    assert f"rank {hung}: training after step 4, in no collective" in report
    for other in range(np_ - 1):
        assert f"rank {other}: training after step 4, gradients in bucket allreduce" in report


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_rank_hanging_in_forward_is_named_on_either_backend(tmp_path, backend):
    r, report = hang_run(tmp_path, 2, "hang", 1, "--backend", backend)
    assert blames(report, 2, 1), report
    assert "rank 0: training after step 4, gradients in" in report


@pytest.mark.parametrize("np_", [2, 3])
def test_rank_that_skips_a_collective_is_named(tmp_path, np_):
    # The last rank skips step 5's vote (a control collective) and goes on into step 6's
    # bucket allreduce, while the others wait in the vote it never issued.
    skipper = np_ - 1
    r, report = hang_run(tmp_path, np_, "skip", skipper)
    assert blames(report, np_, skipper), report
    assert "skipped a collective" in report
    assert f"rank {skipper}: training after step 5, gradients in bucket allreduce" in report
    for other in range(np_ - 1):
        assert f"rank {other}: training after step 4, control in allreduce-max" in report
