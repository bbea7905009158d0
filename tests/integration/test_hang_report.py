"""The hang report names the rank that holds the job up (hpcaccel/hang_report.py)."""
import time

import pytest

from hpcaccel.hang_report import summarize
from support import train_cli

from test_reliability import FAULTY  # the faulty-model helper: FAULT=hang sleeps in forward


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


@pytest.mark.parametrize("np_", [2, 3])
def test_rank_hanging_in_forward_is_named(tmp_path, np_):
    (tmp_path / "faultymodel.py").write_text(FAULTY)
    hung = np_ - 1
    out = tmp_path / "run"
    t0 = time.time()
    r = train_cli(np_, "--out", str(out), "--epochs", "3", "--model", "faultymodel:faulty",
                  "--stall-timeout", "5", timeout=240,
                  env={"PYTHONPATH": str(tmp_path), "FAULT": "hang", "FAULT_RANK": str(hung),
                       "FAULT_STEP": "5"})
    assert r.returncode != 0 and time.time() - t0 < 200, r.stderr[-3000:]
    report = (out / "hang-report.txt").read_text()
    assert report.startswith(f"hpcaccel: hang report ({np_} of {np_} ranks reported): "
                             f"rank(s) {hung} to blame"), report
    assert f"rank {hung}: training after step 4, in no collective" in report
    assert "hpcaccel: hang report" in r.stderr
    for other in range(np_ - 1):
        assert f"rank {other}: training after step 4, gradients in bucket allreduce" in report
    assert sorted(p.name for p in (out / "hang-report").iterdir()) == \
        [f"rank-{i}.txt" for i in range(np_)]
