"""How the integration tests start real jobs: through scripts/mpirun.sh, as users do."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def mpirun_python(np_, *args, timeout=240, env=None) -> subprocess.CompletedProcess:
    """`python ARGS...` on np_ MPI ranks; output captured."""
    cmd = ["bash", os.path.join(ROOT, "scripts", "mpirun.sh"), str(np_), sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def train_cli(np_, *args, timeout=300, env=None) -> subprocess.CompletedProcess:
    """`python -m hpcaccel.train ARGS...` on np_ ranks, without the progress bar."""
    return mpirun_python(np_, "-m", "hpcaccel.train", "--progress", "false", *args,
                         timeout=timeout, env=env)
