"""Elastic jobs (`render cpu --elastic`) without a cluster: the render-time check that every
node count the job may go on with keeps the global batch (hpcaccel/slurm/elastic.py), and
the batch shell's relaunch loop run by bash with stand-ins for srun and Slurm's client
commands. The nodes are named n1, n2, which no host resolves, as where NodeName is not a
host name: a lost node is what Slurm's controller reports, nothing else. The loop on a real
2-node cluster is tests/hosts/test_slurm_nodes.py."""
import contextlib
import io
import itertools
import os
import subprocess

import pytest

from hpcaccel import slurm
from hpcaccel.errors import UsageError
from hpcaccel.slurm import elastic


def _keeps(nodes, min_nodes, ranks, batch):
    return all(nodes * ranks * batch % (k * ranks) == 0 for k in range(min_nodes, nodes + 1))


@pytest.mark.parametrize("nodes,min_nodes,ranks", [
    (n, m, r) for n, m, r in itertools.product(range(2, 9), range(1, 9), (1, 2, 4)) if m <= n])
def test_the_check_refuses_exactly_what_cannot_keep_the_global_batch_and_its_fixes_work(
        nodes, min_nodes, ranks):
    for batch in (1, 7, 16, 24, 32):
        if _keeps(nodes, min_nodes, ranks, batch):
            elastic.check(nodes, min_nodes, ranks, batch)
            continue
        with pytest.raises(UsageError) as e:
            elastic.check(nodes, min_nodes, ranks, batch, min_nodes_flag="--min-nodes")
        line = str(e.value)
        assert line.startswith("--min-nodes: the global batch") and "\n" not in line, line
        suggested = line.split(": use ")[1]
        sizes = suggested.split("--batch-size ")[1].split(" (")[0].replace(",", " or").split(" or ")
        assert sizes and all(_keeps(nodes, min_nodes, ranks, int(b)) for b in sizes), line
        if "--min-nodes " in suggested:
            lowest = int(suggested.split("--min-nodes ")[1].split()[0])
            assert lowest < nodes and _keeps(nodes, lowest, ranks, batch), line
            assert not _keeps(nodes, lowest - 1, ranks, batch), line


# a job of 2 nodes x 2 ranks (cores_per_socket 1, 2 sockets) that asks Slurm every second
ELASTIC = ["cpu", "--elastic", "--nodes", "2", "--set", "cores_per_socket=1",
           "--set", "probe_seconds=1", "--", "--data", "digits"]

SRUN = """#!/bin/bash
# stand-in srun: launch N (HPCACCEL_LAUNCH) records its argv and does what STUB_LAUNCH_N says
out=$STUB_OUT; n=$HPCACCEL_LAUNCH
printf '%s\\0' "$@" > "$out/argv-$n"
mode=STUB_LAUNCH_$n; mode=${!mode:-ok}
case $mode in
  ok) exit 0 ;;
  fail*) exit "${mode#fail}" ;;
  lose-n2)  # as when host n2 dies: Slurm marks it, the ranks wait until the step is ended;
    # srun aborts on SIGINT (python: bash cannot trap the INT a background job ignores)
    echo "MIXED+NOT_RESPONDING" > "$out/state-n2"
    exec python3 -c '
import signal, sys, time
def end(*_):
    open(sys.argv[1], "a").write("int"); sys.exit(130)
signal.signal(signal.SIGINT, end)
time.sleep(15)' "$out/signals-$n" ;;
esac
"""
# scontrol: the controller's view; a node's state is MIXED unless STUB_OUT/state-NODE says
# otherwise; STUB_OUT/node-queries records each `show node`
SCONTROL = """#!/bin/bash
out=$STUB_OUT
case "$1 $2" in
  "show config") echo "SlurmdTimeout           = ${STUB_SLURMD_TIMEOUT:-300} sec" ;;
  "show hostnames") tr , '\\n' <<<"$3" ;;
  "show node")
    echo "$*" >> "$out/node-queries"
    for n in $(tr , ' ' <<<"$4"); do
      state=$(cat "$out/state-$n" 2>/dev/null || echo MIXED)
      [ -e "$out/later-$n" ] && [ "$(wc -l < "$out/node-queries")" -ge 3 ] && state=$(cat "$out/later-$n")
      echo "NodeName=$n Arch=x86_64 CoresPerSocket=1 NodeAddr=10.0.0.${n#n} OS=Linux 6.1 #1 SMP State=$state ThreadsPerCore=1 Reason=State=DOWN by hand"
    done ;;
  requeue*) echo "$*" >> "$out/requeue" ;;
esac
"""
QUIET = "#!/bin/bash\nexit 0\n"  # squeue lists no steps, scancel has nothing to do


@pytest.fixture
def job(tmp_path):
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("squeue", QUIET), ("scancel", QUIET)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert slurm.main(["render", *ELASTIC]) == 0
    script = tmp_path / "job.sbatch"
    script.write_text(buf.getvalue())

    def run(**env):
        full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
                "STUB_OUT": str(out), "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "job",
                "SLURM_NTASKS": "4", "SLURM_CPUS_PER_TASK": "1", "SLURM_JOB_NODELIST": "n1,n2",
                **env}
        r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=full, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        return r.returncode, r.stdout

    return run, out


def _argv(out, launch):
    return (out / f"argv-{launch}").read_text().split("\0")[:-1]


def test_a_node_slurm_reports_not_responding_is_lost_and_the_step_goes_on_without_it(job):
    run, out = job
    (out / "state-n1").write_text("MIXED+DRAIN\n")  # an admin's "no new jobs": n1 still runs it
    rc, log = run(STUB_LAUNCH_1="lose-n2", STUB_LAUNCH_2="ok")
    assert rc == 0, log
    assert "lost node(s) n2 at " in log and "Slurm reports n2 MIXED+NOT_RESPONDING; ending the step" in log, log
    assert "relaunching at" in log and "on the 1 node(s) left (n1)" in log, log
    assert (out / "signals-1").exists(), log  # the first step was ended, not left to hang
    first, second = _argv(out, 1), _argv(out, 2)
    assert "--nodelist=n1,n2" in first and "--ntasks=4" in first, first
    assert "--nodelist=n1" in second and "--ntasks=2" in second and "--overlap" in second, second
    # one controller query per probe for all the nodes in use: both, then the one left
    queries = (out / "node-queries").read_text().splitlines()
    both = queries.count("show node -o n1,n2")
    assert both >= 1 and queries == ["show node -o n1,n2"] * both + ["show node -o n1"] * (len(queries) - both), queries


def test_a_failed_step_waits_for_slurm_to_tell_a_lost_node(job):
    """mpirun ends as soon as it loses a daemon, before Slurm has marked the node: the shell
    asks again until Slurm reports it (here at the third query), then relaunches."""
    run, out = job
    (out / "later-n2").write_text("DOWN+NOT_RESPONDING\n")
    rc, log = run(STUB_LAUNCH_1="fail1", STUB_LAUNCH_2="ok", STUB_SLURMD_TIMEOUT="30")
    assert rc == 0, log
    assert "the step failed (exit 1)" in log and "asking Slurm again for up to 30 s" in log, log
    assert "lost node(s) n2 at " in log and "Slurm reports n2 DOWN+NOT_RESPONDING" in log, log
    assert "--nodelist=n1" in _argv(out, 2), log


@pytest.mark.parametrize("code,waits", [(1, True), (2, False)])
def test_a_step_that_fails_while_every_node_is_up_is_not_relaunched(job, code, waits):
    """Asked again for SlurmdTimeout (2 s here) after a failure, not after exit 2 (bad input)."""
    run, out = job
    rc, log = run(STUB_LAUNCH_1=f"fail{code}", STUB_SLURMD_TIMEOUT="2")
    assert rc == code, log
    assert f"the step failed (exit {code}) while Slurm reports every node up: not relaunching" in log, log
    assert not (out / "argv-2").exists(), log
    queries = len((out / "node-queries").read_text().splitlines())  # a probe, then the wait's
    assert (queries >= 3 if waits else queries <= 2) and ("asking Slurm again" in log) == waits, (queries, log)
