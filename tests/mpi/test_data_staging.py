"""--stage-dir at any world size: one copy per host of the files its ranks read, verified by
size, read from there (the others in place), and a stage directory without room fails every
rank with one line."""
import dataclasses
import os

import numpy as np
import pytest

from hpcaccel.control import ControlPlane
from hpcaccel.data import RankReader, open_dataset, write_file, write_index
from hpcaccel.data.staging import copy_files
from hpcaccel.errors import UsageError

pytestmark = pytest.mark.mpi(min_size=1)


def data_files(directory):
    """The copied files in a copy directory (not its lock and source record)."""
    return sorted(n for n in os.listdir(directory) if not n.startswith("."))


@pytest.fixture
def sharded(comm, tmp_path_factory):
    index = None
    if comm.Get_rank() == 0:
        d = tmp_path_factory.mktemp("src")
        files = []
        for s in range(4):
            idx = np.arange(s * 40, (s + 1) * 40)
            path = str(d / f"part-{s}.h5")
            write_file(path, [idx[:, None].astype(np.float32)], [idx % 2], 40, (1,), 2, "t", chunk_rows=8)
            files.append(path)
        index = write_index(str(d), files, [40] * 4, (1,), 2, "t")
    return open_dataset(comm.bcast(index))


def test_staged_copy_is_read_from_the_stage_dir_with_the_same_samples(comm, sharded, tmp_path_factory):
    from hpcaccel.data.staging import stage

    control = ControlPlane(comm)
    local = comm.Split_type(0)  # MPI_COMM_TYPE_SHARED: this host's ranks
    stage_dir = comm.bcast(str(tmp_path_factory.mktemp("stage")) if comm.Get_rank() == 0 else None)
    staged = stage(sharded, stage_dir, control, local.Get_rank())
    assert all(p.startswith(stage_dir) and os.path.getsize(p) == os.path.getsize(s)
               for p, s in zip(staged.files, sharded.files))
    assert len(data_files(os.path.dirname(staged.files[0]))) == len(sharded.files)  # one copy
    rank, size = comm.Get_rank(), comm.Get_size()

    def samples(ds):
        return [x[:, 0].tolist() for x, _ in RankReader(ds, rank, size, 4, True, seed=3).epoch(0)]
    assert samples(staged) == samples(sharded)
    again = stage(sharded, stage_dir, control, local.Get_rank())  # already there: reused
    assert again.files == staged.files


def test_only_the_needed_files_are_staged_the_others_read_in_place(comm, sharded, tmp_path_factory):
    from hpcaccel.data.staging import stage

    control = ControlPlane(comm)
    local = comm.Split_type(0)
    stage_dir = comm.bcast(str(tmp_path_factory.mktemp("stage")) if comm.Get_rank() == 0 else None)
    stats = {}
    staged = stage(sharded, stage_dir, control, local.Get_rank(), needed=[3, 1], stats=stats)
    assert [p.startswith(stage_dir) for p in staged.files] == [False, True, False, True]
    assert staged.files[0] == sharded.files[0] and staged.files[2] == sharded.files[2]
    assert data_files(os.path.dirname(staged.files[1])) == \
        sorted(os.path.basename(staged.files[i]) for i in (1, 3))
    assert stats["files"] == 2
    assert stats["bytes_copied"] == (sum(os.path.getsize(sharded.files[i]) for i in (1, 3))
                                     if local.Get_rank() == 0 else 0)
    rank, size = comm.Get_rank(), comm.Get_size()

    def samples(ds):
        return [x[:, 0].tolist() for x, _ in RankReader(ds, rank, size, 4, True, seed=3).epoch(0)]
    assert samples(staged) == samples(sharded)


def test_stage_run_stages_what_this_hosts_ranks_read_in_the_epochs_left(comm, sharded, tmp_path_factory):
    from types import SimpleNamespace

    from mpi4py import MPI

    from hpcaccel.data.staging import host_eval_files, host_files, host_ranks, stage_run

    control = ControlPlane(comm)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    world = SimpleNamespace(node_name=MPI.Get_processor_name(), local_rank=local.Get_rank(),
                            size=comm.Get_size())
    ranks = host_ranks(comm.allgather(world.node_name), world.node_name)
    stage_dir = comm.bcast(str(tmp_path_factory.mktemp("stage")) if comm.Get_rank() == 0 else None)
    cfg = SimpleNamespace(stage_dir=stage_dir, epochs=3, batch_size=4, shuffle=True, seed=5)
    test_ds = dataclasses.replace(sharded, files=sharded.files[:2], lengths=sharded.lengths[:2])
    train, test, summary = stage_run(cfg, control, world, sharded, test_ds, start_epoch=2)
    need = host_files(sharded, ranks, world.size, 4, True, 5, range(2, 3))
    assert [i for i, p in enumerate(train.files) if p.startswith(stage_dir)] == list(need)
    need_test = host_eval_files(test_ds, ranks, world.size)
    assert [i for i, p in enumerate(test.files) if p.startswith(stage_dir)] == list(need_test)
    assert summary["train_files_per_host_max"] >= len(need) and summary["seconds_max"] >= 0
    # a run resumed at its last epoch's end stages no training file
    done = SimpleNamespace(**{**vars(cfg), "stage_dir": stage_dir + "-later"})
    train, _, summary = stage_run(done, control, world, sharded, None, start_epoch=3)
    assert train.files == sharded.files and summary["train_files_per_host_max"] == 0


def test_no_room_is_one_line(sharded, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100, 100, 10))
    targets = [str(tmp_path / "s" / os.path.basename(f)) for f in sharded.files]
    with pytest.raises(UsageError, match=f"--stage-dir {tmp_path}: the data needs .* GiB free there"):
        copy_files(sharded.files, targets, str(tmp_path))
    assert not [n for n in os.listdir(tmp_path / "s")]
