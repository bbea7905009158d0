"""Training features end to end under real mpirun: mixed precision, accumulation,
large-batch recipe, and fine-tuning with a frozen body and a new head."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from support import train_cli


def mpirun(np_, *args, **kw):
    return train_cli(np_, "--backend", "mpi", *args, **kw)


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("flags", [
    ["--precision", "bf16"],
    ["--accum-steps", "4"],
    ["--optimizer", "lars", "--lr", "2", "--lr-ref-batch", "64", "--warmup-epochs", "1",
     "--lr-schedule", "cosine", "--weight-decay", "1e-4", "--clip-grad-norm", "5",
     "--label-smoothing", "0.1", "--augment", "shift"],
], ids=["bf16", "accum4", "lars-recipe"])
def test_digits_at_4_ranks_reaches_95_percent(tmp_path, flags):
    out = tmp_path / "run"
    r = mpirun(4, "--out", str(out), "--epochs", "10", *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = summary_of(out)
    assert summary["world_size"] == 4 and summary["test_accuracy"] >= 0.95, summary
    assert summary["steps"] == 10 * (1437 // (16 * 4))  # accumulation splits batches, not steps


def pack_digits(path, keep, split):
    from hpcaccel.data.sources import digits_split
    x, y = (digits_split()[0] if split == "train" else digits_split()[1])
    mask = np.isin(y, keep)
    np.savez(path.with_suffix(".npz"), x=x[mask], y=y[mask].astype(np.int64))
    r = subprocess.run([sys.executable, "-m", "hpcaccel.data", "pack", "--source",
                        str(path.with_suffix(".npz")), "--out", str(path)] +
                       (["--classes", "10"] if max(keep) > 4 else []),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return str(path)


def test_fine_tune_5_to_9_on_a_frozen_body_trained_on_0_to_4(tmp_path):
    low = [pack_digits(tmp_path / f"low-{s}.h5", [0, 1, 2, 3, 4], s) for s in ("train", "test")]
    high = [pack_digits(tmp_path / f"high-{s}.h5", [5, 6, 7, 8, 9], s) for s in ("train", "test")]
    pre = tmp_path / "pre"
    r = mpirun(2, "--out", str(pre), "--data", low[0], "--test-data", low[1], "--epochs", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    pretrained = torch.load(pre / "model.pt", weights_only=True)
    assert pretrained["head.weight"].shape[0] == 5

    tuned = tmp_path / "tuned"
    r = mpirun(2, "--out", str(tuned), "--data", high[0], "--test-data", high[1], "--epochs", "8",
               "--init-from", str(pre / "model.pt"), "--freeze", "body")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kept fresh: head.weight, head.bias" in r.stdout
    summary = summary_of(tuned)
    assert summary["test_accuracy"] >= 0.9, summary  # a linear head on frozen 0-4 features
    state = torch.load(tuned / "model.pt", weights_only=True)
    assert state["head.weight"].shape[0] == 10  # a new head for the new class count
    # frozen parameters are unchanged (BatchNorm running statistics still update in training)
    frozen = [n for n in pretrained if n.startswith("body.") and n.endswith(("weight", "bias"))]
    assert len(frozen) >= 4, frozen
    for name in frozen:
        assert torch.equal(state[name], pretrained[name]), name


def test_timeline_has_every_ranks_spans(tmp_path):
    trace = tmp_path / "trace.json"
    r = mpirun(2, "--out", str(tmp_path / "run"), "--epochs", "2", "--timeline", str(trace))
    assert r.returncode == 0, r.stderr[-3000:]
    events = json.loads(trace.read_text())
    spans = [e for e in events if e["ph"] == "X"]
    steps = json.loads((tmp_path / "run" / "summary.json").read_text())["steps"]
    for rank in range(2):
        mine = [e for e in spans if e["pid"] == rank]
        names = {e["name"] for e in mine}
        assert {"data_wait", "forward_backward", "allreduce_wait", "optimizer_step",
                "bucket_allreduce", "evaluate"} <= names
        assert sum(e["name"] == "forward_backward" for e in mine) == steps
        assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in mine)
    assert {e["args"]["name"] for e in events if e["name"] == "process_name"} == {"rank 0", "rank 1"}
