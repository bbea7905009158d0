"""The doctor's verdicts from tables of rank facts (pure logic), and the sysfs topology."""
import pytest

from hpcaccel import env
from hpcaccel.doctor.__main__ import parse_args
from hpcaccel.doctor.verdicts import (RankRow, cpulist, data_verdicts, horovod_verdicts,
                                      layout_verdicts, out_verdicts, table, world_verdicts)
from hpcaccel.errors import UsageError


def row(rank, cpus, host="n1", threads=1, sockets=None, host_sockets=1, local_rank=None):
    cpus = frozenset(cpus)
    return RankRow(host=host, rank=rank, local_rank=rank if local_rank is None else local_rank,
                   cpus=cpus, sockets=frozenset(sockets or {0}), numa=frozenset({0}),
                   host_sockets=host_sockets, threads=threads)


def problems(verdicts):
    return [v for v in verdicts if v.severity == "problem"]


def test_one_rank_per_core_is_healthy():
    assert layout_verdicts([row(0, {0}), row(1, {1})], None) == []


def test_unbound_ranks_sharing_evenly_are_healthy():
    rows = [row(r, range(8), threads=4) for r in range(2)]
    assert layout_verdicts(rows, None) == []


def test_more_ranks_than_cores_is_a_note_only():
    rows = [row(r, {0, 1}) for r in range(4)]
    verdicts = layout_verdicts(rows, None)
    assert [v.severity for v in verdicts] == ["note"]
    assert "4 ranks on 2 cores" in verdicts[0].text


def test_threads_beyond_cores_is_a_problem_naming_the_fair_share():
    rows = [row(r, {0, 1}, threads=2) for r in range(4)]
    (p,) = problems(layout_verdicts(rows, threads_flag=2))
    assert "8 threads on 2 cores" in p.text and "--threads 1" in p.fix


def test_oversubscription_is_judged_per_host():
    rows = [row(0, {0, 1}, host="a", threads=2), row(1, {0, 1}, host="b", threads=2)]
    assert layout_verdicts(rows, 2) == []
    rows.append(row(2, {0, 1}, host="b", threads=2, local_rank=1))
    (p,) = problems(layout_verdicts(rows, 2))
    assert p.text.startswith("b:")


def test_partially_overlapping_bindings_are_a_problem():
    (p,) = problems(layout_verdicts([row(0, {0, 1}), row(1, {1, 2})], None))
    assert "share cores 1" in p.text and "--bind-to" in p.fix


def test_rank_spanning_sockets_when_one_per_socket_was_meant():
    rows = [row(0, range(8), sockets={0, 1}, host_sockets=2, threads=4),
            row(1, range(8), sockets={0, 1}, host_sockets=2, threads=4)]
    (p,) = problems(layout_verdicts(rows, None))
    assert "span several sockets" in p.text and "--bind-to socket" in p.fix
    bound = [row(0, range(4), sockets={0}, host_sockets=2, threads=4),
             row(1, range(4, 8), sockets={1}, host_sockets=2, threads=4)]
    assert layout_verdicts(bound, None) == []


def test_launcher_world_size_mismatch():
    (p,) = world_verdicts(1, (4, "srun (SLURM_STEP_NUM_TASKS)"), "MULTIPLE", True)
    assert "started 4" in p.text and "--mpi=pmix" in p.fix
    assert world_verdicts(4, (4, "x"), "MULTIPLE", True) == []
    assert world_verdicts(4, None, "MULTIPLE", True) == []
    (p,) = world_verdicts(4, None, "FUNNELED", False)
    assert "SERIALIZED" in p.text


def test_horovod_verdicts():
    assert horovod_verdicts([None, None]) == []
    (v,) = horovod_verdicts(["no module", "no module"])
    assert v.severity == "note" and "--backend horovod would fail" in v.text
    (v,) = horovod_verdicts([None, "no module", None])
    assert v.severity == "problem" and "rank(s) 1" in v.text


def test_data_verdicts():
    assert data_verdicts("d.h5", [(None, 10)] * 3) == []
    (p,) = data_verdicts("d.h5", [("--data d.h5: no such file", None)] * 2)
    assert "every rank" in p.text
    (p,) = data_verdicts("d.h5", [(None, 10), ("--data d.h5: no such file", None)])
    assert "rank(s) 1" in p.text and "every host mounts" in p.fix
    (p,) = data_verdicts("d.h5", [(None, 10), (None, 12)])
    assert "different sample counts" in p.text


def test_out_verdicts():
    assert out_verdicts("o", None, []) == []
    (p,) = out_verdicts("o", "PermissionError: denied", [])
    assert "rank 0 cannot write" in p.text
    (p,) = out_verdicts("o", None, ["node2"])
    assert "node2" in p.text and "--resume" in p.text
    (p,) = out_verdicts("o", None, [], refused="--out o: holds the outputs of run x; ...",
                        flags="--resume none --overwrite false")
    assert p.line() == ("PROBLEM: hpcaccel.train --resume none --overwrite false would stop "
                        "with exit 2: --out o: holds the outputs of run x; ...")


def test_one_core_and_one_rank_read_in_the_singular():
    (v,) = layout_verdicts([row(0, {0}), row(1, {0})], None)
    assert v.text.startswith("n1: 2 ranks on 1 core time-share")
    (p,) = problems(layout_verdicts([row(0, {0}, threads=2)], 2))
    assert "1 rank x threads = 2 threads on 1 core (oversubscribed)" in p.text


def test_table_and_cpulists():
    assert cpulist({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    text = table([row(1, {1}), row(0, {0})])
    lines = text.splitlines()
    assert lines[0].split() == ["host", "rank", "local", "cpus", "sockets", "numa", "threads"]
    assert [line.split()[1] for line in lines[1:]] == ["0", "1"]


def test_cpu_topology_from_sysfs(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "online").write_text("0-3\n")
    for cpu in range(4):
        topo = tmp_path / "cpu" / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        topo.joinpath("physical_package_id").write_text(f"{cpu // 2}\n")
    for node, cpus in ((0, "0-1"), (1, "2-3")):
        (tmp_path / "node" / f"node{node}").mkdir(parents=True)
        (tmp_path / "node" / f"node{node}" / "cpulist").write_text(cpus + "\n")
    assert env.cpu_topology(str(tmp_path)) == {0: (0, 0), 1: (0, 0), 2: (1, 1), 3: (1, 1)}
    assert env.parse_cpulist("0-2,5,7-8") == {0, 1, 2, 5, 7, 8}


@pytest.mark.parametrize("argv, flag", [(["--threads", "0"], "--threads"),
                                        (["--grad-mb", "10"], "--compute-ms"),
                                        (["--grad-mb", "-1", "--compute-ms", "5"], "--grad-mb"),
                                        (["--bogus"], "--bogus")])
def test_bad_usage_names_the_flag(argv, flag):
    with pytest.raises(UsageError, match=flag):
        parse_args(argv, quiet=True)


def test_resume_and_overwrite_default_to_trains():
    args = parse_args(["--out", "o"], quiet=True)
    assert (args.resume, args.overwrite) == ("none", False)
    args = parse_args(["--out", "o", "--resume", "auto", "--overwrite", "true"], quiet=True)
    assert (args.resume, args.overwrite) == ("auto", True)
