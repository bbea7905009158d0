"""python -m hpcaccel.horovod: an unchanged `import horovod.torch` script runs on
hpcaccel.torch under mpirun; a real Horovod beside it stays what other processes import;
bad usage is one line and exit 2; a rank that fails ends the whole job."""
import os
import subprocess
import sys
import textwrap

import pytest

from support import ROOT, WHY_NO_HOROVOD, mpirun_python

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import horovod
    import horovod.torch as hvd
    from horovod.torch.mpi_ops import allreduce_
    from horovod.common.exceptions import HorovodInternalError

    hvd.init()
    total = hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum).item()
    t = torch.ones(2)
    allreduce_(t, None, "positional", hvd.Sum)
    if hvd.rank() == 0:
        print("module", hvd.__name__, "version", horovod.__version__, "size", hvd.size(),
              "total", total, "inplace", t.tolist(), "args", sys.argv[1:])
""")


def test_unchanged_horovod_script_runs_on_hpcaccel(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    r = mpirun_python(2, "-m", "hpcaccel.horovod", str(script), "--epochs", "3", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("module hpcaccel.torch version 0.28.1 size 2 total 2.0 inplace [2.0, 2.0] "
            "args ['--epochs', '3']") in r.stdout


def test_module_form(tmp_path):
    (tmp_path / "mytrain.py").write_text(SCRIPT)
    r = mpirun_python(2, "-m", "hpcaccel.horovod", "-m", "mytrain", "x", timeout=120,
                      env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "module hpcaccel.torch" in r.stdout and "args ['x']" in r.stdout


@pytest.mark.skipif(WHY_NO_HOROVOD is not None, reason=f"Horovod not usable: {WHY_NO_HOROVOD}")
def test_real_horovod_is_untouched():
    r = subprocess.run([sys.executable, "-c", "import horovod.torch as h; print(h.__name__, h.__file__)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("horovod.torch ")
    assert "hpcaccel" not in r.stdout


def test_bad_usage_is_one_line_and_exit_2(tmp_path):
    for args, says in ((["/nonexistent/train.py"], "/nonexistent/train.py: no such script"),
                       ([], "usage:"), (["-m"], "-m needs a module name")):
        r = subprocess.run([sys.executable, "-m", "hpcaccel.horovod", *args], capture_output=True,
                           text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 2 and says in r.stderr, (args, r.stderr)


def test_a_failing_rank_ends_every_rank(tmp_path):
    """Rank 1 raises while rank 0 waits in a collective: the job ends (no hang), with the
    traceback and a line saying every rank is being ended."""
    script = tmp_path / "fails.py"
    script.write_text(textwrap.dedent("""
        import torch
        import horovod.torch as hvd
        hvd.init()
        if hvd.rank() == 1:
            raise RuntimeError("boom on rank 1")
        hvd.allreduce(torch.ones(1))
    """))
    r = mpirun_python(2, "-m", "hpcaccel.horovod", str(script), timeout=120)
    assert r.returncode != 0
    assert "boom on rank 1" in r.stderr and "ending every rank of the job" in r.stderr


STALL = textwrap.dedent("""
    import time
    import torch
    import horovod.torch as hvd
    hvd.init()
    if hvd.rank() == 1:
        time.sleep(DELAY)
    if hvd.rank() == 0 or DELAY < 100:
        hvd.allreduce(torch.ones(1), name="late")
    print("rank", hvd.rank(), "finished", flush=True)
""")


def test_stall_warning_names_the_waiting_operation(tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(STALL.replace("DELAY", "3"))
    r = mpirun_python(2, "-m", "hpcaccel.horovod", str(script), timeout=120,
                      env={"HOROVOD_STALL_CHECK_TIME_SECONDS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank 0 has waited" in r.stderr and "allreduce 'late'" in r.stderr
    assert r.stdout.count("finished") == 2


def test_stall_shutdown_ends_the_job(tmp_path):
    """Rank 1 never submits: with HOROVOD_STALL_SHUTDOWN_TIME_SECONDS the job ends, not hangs."""
    script = tmp_path / "stall.py"
    script.write_text(STALL.replace("DELAY", "600"))
    r = mpirun_python(2, "-m", "hpcaccel.horovod", str(script), timeout=120,
                      env={"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "2"})
    assert r.returncode != 0
    assert "ending every rank (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS)" in r.stderr
