"""--stage-dir at any world size: one copy per host, verified by size, read from there, and a
stage directory without room fails every rank with one line."""
import os

import numpy as np
import pytest

from hpcaccel.control import ControlPlane
from hpcaccel.data import RankReader, open_dataset, write_file, write_index
from hpcaccel.data.staging import copy_files
from hpcaccel.errors import UsageError

pytestmark = pytest.mark.mpi(min_size=1)


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
    assert len(os.listdir(os.path.dirname(staged.files[0]))) == len(sharded.files)  # one copy
    rank, size = comm.Get_rank(), comm.Get_size()

    def samples(ds):
        return [x[:, 0].tolist() for x, _ in RankReader(ds, rank, size, 4, True, seed=3).epoch(0)]
    assert samples(staged) == samples(sharded)
    again = stage(sharded, stage_dir, control, local.Get_rank())  # already there: reused
    assert again.files == staged.files


def test_no_room_is_one_line(sharded, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100, 100, 10))
    targets = [str(tmp_path / "s" / os.path.basename(f)) for f in sharded.files]
    with pytest.raises(UsageError, match=f"--stage-dir {tmp_path}: the data needs .* GiB free there"):
        copy_files(sharded.files, targets, str(tmp_path))
    assert not [n for n in os.listdir(tmp_path / "s")]
