"""--stage-dir across emulated hosts: the same path is a private directory on each host (a
bind mount in the host's own mount namespace), so each host's copies really are its own.
Each host stages exactly the files its ranks read (training over the run's epochs, and
their evaluation parts), a strict subset here, and the trained model is bit-identical to
a run that reads every file in place."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from hpcaccel.data import write_file, write_index
from hpcaccel.data.hdf5 import open_dataset
from hpcaccel.data.staging import host_eval_files, host_files
from support import assert_same_model

SHARDS, PER_SHARD, TEST_SHARDS, K, BATCH = 8, 64, 4, 2, 8


def shards(directory, count, seed):
    directory.mkdir()
    rng = np.random.default_rng(seed)
    files = []
    for s in range(count):
        x = rng.standard_normal((PER_SHARD, 4), dtype=np.float32)
        path = str(directory / f"part-{s:03d}.h5")
        write_file(path, [x], [(x[:, 0] > 0).astype(np.int64)], PER_SHARD, (4,), 2, "test",
                   chunk_rows=4)
        files.append(path)
    return write_index(str(directory), files, [PER_SHARD] * count, (4,), 2, "test")


def train(hosts, out, *args, private=None):
    """`python -m hpcaccel.train` with K ranks per host; with `private` = (base, dir), every
    host first binds base/<its hostname> over dir and records its ranks there."""
    cmd = (f"{sys.executable} -m hpcaccel.train --progress false --out {out} "
           + " ".join(map(str, args)))
    if private:
        base, local = private
        cmd = (f'mkdir -p {base}/"$(hostname)" && mount --bind {base}/"$(hostname)" {local} && '
               f'touch {base}/"rank-$OMPI_COMM_WORLD_RANK-on-$(hostname)" && exec {cmd}')
    return hosts.run(K, "sh", "-c", cmd, limit=300)


def test_each_host_stages_the_files_its_ranks_read_and_the_model_is_the_same(hosts, tmp_path):
    index, test_index = shards(tmp_path / "train", SHARDS, 0), shards(tmp_path / "test", TEST_SHARDS, 1)
    base, local = tmp_path / "per-host", tmp_path / "local"
    base.mkdir()
    local.mkdir()
    common = ["--data", index, "--test-data", test_index, "--model", "mlp", "--epochs", 1,
              "--batch-size", BATCH, "--shuffle", "true", "--threads", 1]
    r = train(hosts, tmp_path / "staged", *common, "--stage-dir", local, private=(base, local))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert list(local.iterdir()) == []  # nothing landed in the shared directory itself
    world = K * hosts.count
    ranks = {name: sorted(int(p.name.split("-")[1]) for p in base.glob(f"rank-*-on-{name}"))
             for name in hosts.names}
    assert sorted(r for rs in ranks.values() for r in rs) == list(range(world))
    train_ds, test_ds = open_dataset(index), open_dataset(test_index)
    for name in hosts.names:
        need = host_files(train_ds, ranks[name], world, BATCH, True, 0, range(1))
        need_test = host_eval_files(test_ds, ranks[name], world)
        assert 0 < len(need) < SHARDS and 0 < len(need_test) < TEST_SHARDS  # strict subsets
        staged = sorted(p.name for p in (base / name).rglob("*.h5"))
        assert staged == sorted([f"{i:05d}-part-{i:03d}.h5" for i in need]
                                + [f"{i:05d}-part-{i:03d}.h5" for i in need_test]), name
        assert not list((base / name).rglob(".staging-*"))  # no partial copies left
    summary = json.loads((tmp_path / "staged" / "summary.json").read_text())
    assert 0 < summary["staging"]["train_files_per_host_max"] < SHARDS
    assert "--stage-dir" in r.stdout and "staged there in" in r.stdout

    r = train(hosts, tmp_path / "in-place", *common)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert_same_model(str(tmp_path / "staged" / "model.pt"), str(tmp_path / "in-place" / "model.pt"))
    assert os.path.exists(tmp_path / "in-place" / "summary.json")
