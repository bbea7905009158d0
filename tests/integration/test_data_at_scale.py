"""The data layer at 16 real MPI ranks over 64 shards (tiny, oversubscribed), counted: start-up
opens each shard once in total (rank 0 inspects, one broadcast), each rank opens few shards
per epoch and reads its share; a damaged file ends the CLI with one line and exit 2; the
counters reach summary.json and the timeline."""
import json
import math
import os

import numpy as np
import pytest

from hpcaccel.data import write_file, write_index
from support import assert_same_model, mpirun_python, train_cli

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD, SHARDS, PER_SHARD, BATCH = 16, 64, 16, 4


def make_shards(directory, shards=SHARDS, per_shard=PER_SHARD, features=4, classes=2):
    files = []
    for s in range(shards):
        idx = np.arange(s * per_shard, (s + 1) * per_shard)
        x = np.repeat(idx[:, None], features, axis=1).astype(np.float32)
        path = os.path.join(directory, f"part-{s:03d}.h5")
        write_file(path, [x], [idx % classes], per_shard, (features,), classes, "test", chunk_rows=4)
        files.append(path)
    return write_index(directory, files, [per_shard] * shards, (features,), classes, "test")


def probe(index, shuffle):
    r = mpirun_python(WORLD, os.path.join(HERE, "data_scale_probe.py"), index, shuffle, timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")]
    assert len(line) == 1, r.stdout[-2000:]
    return json.loads(line[0][len("PROBE "):])


def delta(rank, a, b, key="files_opened"):
    return rank[b][key] - rank[a][key]


@pytest.mark.parametrize("shuffle", ["true", "false"])
def test_16_ranks_open_each_shard_once_at_start_and_few_per_epoch(tmp_path, shuffle):
    result = probe(make_shards(str(tmp_path)), shuffle)
    ranks = result["ranks"]
    assert (result["world"], result["files"], len(ranks)) == (WORLD, SHARDS, WORLD)
    # start-up: every shard inspected once in total, whatever the rank count
    assert sum(delta(r, "begin", "startup") for r in ranks) == SHARDS
    share = (SHARDS * PER_SHARD) // (BATCH * WORLD) * BATCH
    sample_bytes = 4 * 4 + 8
    for i, r in enumerate(ranks):
        for e, (a, b) in enumerate((("startup", "epoch0"), ("epoch0", "epoch1"))):
            opened = delta(r, a, b)
            if shuffle == "true":  # shard-affine: a contiguous run of the permuted shards
                assert opened <= math.ceil(SHARDS / WORLD) + 2, (i, e, opened)
            else:  # global order, rank-count independent: every shard once per epoch
                assert opened <= SHARDS, (i, e, opened)
            assert r[f"samples{e}"] == share
            assert abs(delta(r, a, b, "bytes_read") - share * sample_bytes) <= 4 * sample_bytes
        assert delta(r, "epoch1", "eval") <= math.ceil(SHARDS / WORLD) + 1
    assert sum(r["evaluated"] for r in ranks) == SHARDS * PER_SHARD
    # disjoint shares: no sample in two ranks' first batches
    firsts = [v for r in ranks for batch in r["first_batches"] for v in batch]
    assert len(firsts) == len(set(firsts)) == WORLD * 2 * BATCH


def test_truncated_shard_is_one_line_exit_2(tmp_path):
    index = make_shards(str(tmp_path), shards=4, per_shard=64)
    victim = os.path.join(str(tmp_path), "part-002.h5")
    with open(victim, "rb") as fh:
        data = fh.read()
    with open(victim, "wb") as fh:  # an interrupted copy
        fh.write(data[:len(data) // 2])
    r = train_cli(2, "--data", index, "--model", "mlp", "--epochs", "1", "--batch-size", "8",
                  "--threads", "1", "--out", str(tmp_path / "run"), timeout=400)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if victim in ln]
    assert len(lines) == 1 and "damaged HDF5 file" in lines[0], r.stderr[-2000:]
    assert "set-up failed" not in r.stderr


def test_io_counters_in_summary_and_timeline(tmp_path):
    index = make_shards(str(tmp_path), shards=8, per_shard=64)
    out = tmp_path / "run"
    r = train_cli(2, "--data", index, "--model", "mlp", "--epochs", "2", "--batch-size", "8",
                  "--threads", "1", "--shuffle", "false", "--out", str(out),
                  "--timeline", str(tmp_path / "trace.json"), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    io = json.loads((out / "summary.json").read_text())["data_io_per_rank"]
    sample_bytes = 4 * 4 + 8
    # each rank read its half of the data twice (2 epochs) and the scan its half once
    assert io["bytes_read_min"] >= 3 * (8 * 64 // 2) * sample_bytes * 0.9
    assert io["bytes_read_min"] <= io["bytes_read_max"]
    assert 1 <= io["files_opened_min"] <= io["files_opened_max"]
    events = json.loads((tmp_path / "trace.json").read_text().rstrip().rstrip(",") + "]"
                        if not (tmp_path / "trace.json").read_text().rstrip().endswith("]")
                        else (tmp_path / "trace.json").read_text())
    counters = [e for e in events if e.get("ph") == "C" and e["name"] == "data_io"]
    assert {e["pid"] for e in counters} == {0, 1}
    assert all(e["args"]["files_opened"] >= 1 and e["args"]["bytes_read"] > 0 for e in counters)


def test_stage_dir_copies_once_and_trains_from_there(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    index = make_shards(str(src), shards=4, per_shard=64)
    stage = tmp_path / "local"
    out = tmp_path / "run"
    r = train_cli(2, "--data", index, "--model", "mlp", "--epochs", "1", "--batch-size", "8",
                  "--threads", "1", "--stage-dir", str(stage), "--out", str(out), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    copies = [p for p in stage.rglob("*.h5")]
    assert sorted(p.name.split("-", 1)[1] for p in copies) == [f"part-{s:03d}.h5" for s in range(4)]
    assert all(p.stat().st_size == (src / p.name.split("-", 1)[1]).stat().st_size for p in copies)
    assert json.loads((out / "summary.json").read_text())["steps"] == (4 * 64) // 16


def test_a_changed_shard_replaces_the_superseded_copy_instead_of_piling_up(tmp_path):
    """Two runs on the same --stage-dir with a shard rewritten between them: the second
    stages the new version and removes the first run's copy (no run holds it any more)."""
    src = tmp_path / "src"
    src.mkdir()
    index = make_shards(str(src), shards=4, per_shard=64)
    stage = tmp_path / "local"
    args = ["--data", index, "--model", "mlp", "--epochs", "1", "--batch-size", "8",
            "--threads", "1", "--stage-dir", str(stage)]
    r = train_cli(2, *args, "--out", str(tmp_path / "first"), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    (first,) = [p.name for p in stage.iterdir()]
    x = np.full((64, 4), 7, np.float32)  # shard 1 rewritten with other samples
    write_file(str(src / "part-001.h5"), [x], [np.arange(64) % 2], 64, (4,), 2, "test", chunk_rows=4)
    r = train_cli(2, *args, "--out", str(tmp_path / "second"), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    (second,) = [p.name for p in stage.iterdir()]
    assert second != first and second.startswith("hpcaccel-")
    staging = json.loads((tmp_path / "second" / "summary.json").read_text())["staging"]
    assert staging["superseded_copies_removed_per_host_max"] == 1
    assert staging["superseded_bytes_freed_per_host_max"] > 0


def test_staged_run_continued_equals_one_uninterrupted_run_in_place(tmp_path):
    """A run continued with --stage-dir stages from the epoch it resumes at and gives the
    model of one uninterrupted run reading in place, to the bit."""
    src = tmp_path / "src"
    src.mkdir()
    index = make_shards(str(src), shards=8, per_shard=32)
    args = ["--data", index, "--model", "mlp", "--batch-size", "8", "--threads", "1"]
    full, part, stage = tmp_path / "full", tmp_path / "part", tmp_path / "local"
    r = train_cli(2, *args, "--epochs", "3", "--out", str(full), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    r = train_cli(2, *args, "--epochs", "1", "--stage-dir", str(stage), "--out", str(part), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    r = train_cli(2, *args, "--epochs", "3", "--stage-dir", str(stage), "--out", str(part),
                  "--resume", "auto", timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "--stage-dir" in r.stdout
    assert_same_model(str(part / "model.pt"), str(full / "model.pt"))
