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


def script_state(rank, seq, opened, step=4, this_step=None, last_step=None):
    """A script's rank: counts on the three channels, waiting in `opened` = (channel, kind)."""
    channel, kind = opened
    return {"rank": rank, "phase": "training", "step": step, "seq": dict(seq),
            "this_step": this_step, "last_step": last_step,
            "open": {c: {"seq": seq[c], "kind": kind, "step": step, "bytes": 4, "waiting_s": 5.0}
                     if c == channel else None for c in ("control", "gradients", "collectives")}}


def extra_collective_states(rhythm=True):
    # Each step: one bucket allreduce, one hvd.allreduce, one vote. Rank 1 made an extra
    # hvd.allreduce (#3) after step 4's vote; rank 0 went on into step 5's vote (#13).
    per_step = {"control": 1, "gradients": 1, "collectives": 1}
    return {0: script_state(0, {"control": 13, "gradients": 5, "collectives": 2},
                            ("control", "allreduce-max"), this_step=per_step if rhythm else None,
                            last_step=per_step if rhythm else None),
            1: script_state(1, {"control": 12, "gradients": 5, "collectives": 3},
                            ("collectives", "allreduce"),
                            this_step={"control": 0, "gradients": 1, "collectives": 2}
                            if rhythm else None, last_step=per_step if rhythm else None)}


def test_rule_names_the_rank_that_issued_an_extra_collective():
    blamed, lines = summarize(extra_collective_states(), 2)
    text = "\n".join(lines)
    assert blamed == [1], text
    assert "rank(s) [1] wait in hpcaccel.torch collective #3 (allreduce), which rank(s) [0] " \
           "never issued" in text
    assert "they issued an extra collective" in text and "[0, 1]" not in text
    assert "collectives collectives" not in text


def test_rule_names_the_odd_rank_by_majority_and_says_when_it_cannot_tell():
    # three ranks: ranks 0 and 1 agree (in the vote), rank 2 alone made the extra call
    states = extra_collective_states(rhythm=False)
    states[2] = dict(states[1], rank=2)
    states[1] = dict(states[0], rank=1)
    assert summarize(states, 3)[0] == [2]
    # two ranks and nothing to tell which side is odd: both, and the report says so
    blamed, lines = summarize(extra_collective_states(rhythm=False), 2)
    assert blamed == [0, 1] and "one side skipped a collective or issued an extra one" in lines[-1]


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
def test_rank_that_skips_a_collective_fails_every_rank_naming_the_collectives(tmp_path, np_):
    # The last rank skips step 5's vote (a control collective) and goes on into step 6's
    # bucket allreduce, while the others wait in the vote it never issued: each waits for
    # the other for good, and every rank fails naming both collectives (departure.py,
    # waitgraph.py) long before the stall watchdog (60 s) would write a hang report.
    skipper = np_ - 1
    (tmp_path / "faultymodel.py").write_text(FAULTY)
    out = tmp_path / "run"
    r = train_cli(np_, "--out", str(out), "--epochs", "3", "--model", "faultymodel:faulty",
                  "--stall-timeout", "60", timeout=240,
                  env={"PYTHONPATH": str(tmp_path), "FAULT": "skip", "FAULT_RANK": str(skipper),
                       "FAULT_STEP": "5"})
    assert r.returncode != 0, r.stderr[-3000:]
    assert "hang report" not in r.stderr and not (out / "hang-report.txt").exists(), r.stderr[-3000:]
    assert "the ranks run different collectives" in r.stderr, r.stderr[-3000:]
    said = r.stderr
    assert f"rank {skipper} waits in gradients collective" in said, said[-3000:]
    assert "waits in control collective" in said and "(allreduce-max)" in said, said[-3000:]
