"""Built-in datasets packed by several packers at once (one per node on a shared filesystem):
every packer returns complete files, readers never see half a dataset, nothing is left over."""
import multiprocessing as mp
import os
import time

import h5py
import numpy as np
from hpcaccel.data.sources import builtin_paths, pack_builtin

SAMPLES, SHAPE, CLASSES, SEED = 30000, (32,), 4, 5


def _packer(cache, start, results):
    os.environ["HPCACCEL_DATA"] = cache
    start.wait(timeout=60)  # all packers begin together
    results.put(pack_builtin("synthetic", SAMPLES, SHAPE, CLASSES, SEED))


def _watcher(cache, stop, results):
    """Whenever train.h5 is visible, test.h5 must be too and both must open complete."""
    os.environ["HPCACCEL_DATA"] = cache
    train, test = builtin_paths("synthetic", SAMPLES, SHAPE, CLASSES, SEED)
    seen = 0
    while not stop.is_set():
        if os.path.exists(train):
            ok = os.path.exists(test)
            with h5py.File(train, "r") as f:
                ok = ok and f["x"].shape == (SAMPLES, *SHAPE) and f["y"].shape == (SAMPLES,)
            if not ok:
                results.put("incomplete")
                return
            seen += 1
        time.sleep(0.001)
    results.put(seen)


def test_concurrent_packers_publish_one_complete_dataset(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("HPCACCEL_DATA", cache)
    ctx = mp.get_context("spawn")
    start, stop, results, watched = ctx.Barrier(4), ctx.Event(), ctx.Queue(), ctx.Queue()
    watcher = ctx.Process(target=_watcher, args=(cache, stop, watched))
    watcher.start()
    packers = [ctx.Process(target=_packer, args=(cache, start, results)) for _ in range(4)]
    for p in packers:
        p.start()
    for p in packers:
        p.join(timeout=90)
    stop.set()
    watcher.join(timeout=30)
    assert [p.exitcode for p in packers] == [0] * 4
    paths = {results.get(timeout=5) for _ in packers}
    assert paths == {builtin_paths("synthetic", SAMPLES, SHAPE, CLASSES, SEED)}
    assert watched.get(timeout=5) != "incomplete"

    train, test = paths.pop()
    with h5py.File(train, "r") as f:
        x, y = f["x"][:], f["y"][:]
    assert x.shape == (SAMPLES, *SHAPE) and np.isfinite(x).all() and set(np.unique(y)) <= set(range(CLASSES))
    # one published directory, no staging directories or temp files left behind
    assert os.listdir(cache) == [os.path.basename(os.path.dirname(train))]
    assert sorted(os.listdir(os.path.dirname(train))) == ["test.h5", "train.h5"]


def test_an_incomplete_leftover_is_replaced(tmp_path, monkeypatch):
    """A directory with train.h5 only (a packer of an older version, killed midway)."""
    monkeypatch.setenv("HPCACCEL_DATA", str(tmp_path))
    train, test = builtin_paths("digits", 0, (1,), 10, 0)
    os.makedirs(os.path.dirname(train))
    with open(train, "wb") as fh:
        fh.write(b"torn")
    assert pack_builtin("digits", 0, (1,), 10, 0) == (train, test)
    with h5py.File(train, "r") as f, h5py.File(test, "r") as g:
        assert len(f["y"]) + len(g["y"]) == 1797
    assert os.listdir(tmp_path) == ["digits-v1"]
