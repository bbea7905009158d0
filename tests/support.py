"""What tests of every launcher share: whether Horovod is usable (one skip marker, one
backend parameter) and how a real job is started (scripts/mpirun.sh, as users do).

Importable from any test: tests/conftest.py puts this directory on sys.path."""
import os
import subprocess
import sys

import pytest

from hpcaccel.comm import horovod_unavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WHY_NO_HOROVOD = horovod_unavailable()
requires_horovod = pytest.mark.skipif(WHY_NO_HOROVOD is not None,
                                      reason=f"Horovod not usable: {WHY_NO_HOROVOD}")
# Both backends, Horovod skipped where it is not usable. ids: pytest-mpi takes a bare "mpi"
# keyword (a parameter id) for its own marker and would skip the test, hence "-backend".
BACKEND_PARAMS = [pytest.param("mpi", id="mpi-backend"),
                  pytest.param("horovod", marks=requires_horovod, id="horovod-backend")]


def mpirun_command(np_, *args) -> list[str]:
    """The command line of `python ARGS...` on np_ MPI ranks (for Popen)."""
    return ["bash", os.path.join(ROOT, "scripts", "mpirun.sh"), str(np_), sys.executable, *args]


def mpirun_python(np_, *args, timeout=240, env=None) -> subprocess.CompletedProcess:
    """`python ARGS...` on np_ MPI ranks; output captured; bounded by `timeout`."""
    return subprocess.run(mpirun_command(np_, *args), capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def train_cli(np_, *args, timeout=300, env=None) -> subprocess.CompletedProcess:
    """`python -m hpcaccel.train ARGS...` on np_ ranks, without the progress bar."""
    return mpirun_python(np_, "-m", "hpcaccel.train", "--progress", "false", *args,
                         timeout=timeout, env=env)


def assert_same_model(got, want) -> None:
    """Two saved models (model.pt paths or state_dicts) are identical to the bit: what a
    resumed, requeued or differently launched run must give against an uninterrupted one."""
    import torch

    got, want = (torch.load(m, weights_only=True) if not isinstance(m, dict) else m
                 for m in (got, want))
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
