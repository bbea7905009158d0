"""Whether the user's terminal is behind rank 0's stderr: what `--progress auto` asks.

Under mpirun a rank's own streams say nothing about the user's terminal: Open MPI 4.1 gives
every rank a pseudo-terminal on stdout and a pipe on stderr, whether mpirun itself writes to
a terminal, a pipe or a file, and copies what the ranks write to its own streams (measured:
`mpirun -np 1 python -c 'import sys; print(sys.stdout.isatty(), sys.stderr.isatty())'`
prints `True False` in all three cases; the environment Open MPI gives its ranks is the
same too). So the answer comes from the launcher, first that applies:

1. this process's stderr is a terminal (`python -m hpcaccel.train` typed in one, `srun --pty`);
2. HPCACCEL_TERMINAL=1 or 0: scripts/mpirun.sh (and so `make train`) sets it from whether its
   own stderr is a terminal, and hands it to the ranks on every host;
3. under Open MPI's mpirun on this host: whether mpirun's stderr (/proc/PID/fd/2) is a
   terminal. Open MPI names mpirun's process id in the session directory it gives its ranks
   (OMPI_MCA_orte_jobfam_session_dir=.../pid.PID); it is trusted only when that process is
   an ancestor of this one, so a rank on another host, where the number means nothing,
   answers no;
4. otherwise no: Slurm logs, pipes, files.
"""
from __future__ import annotations

import os
import re

HINT = "HPCACCEL_TERMINAL"
SESSION_DIR = "OMPI_MCA_orte_jobfam_session_dir"
TTY_PATH = re.compile(r"/dev/(pts/\d+|tty\w*|console)")


def decide(own_tty: bool, hint: str | None, launcher_tty: bool | None) -> bool:
    """Pure. Whether to draw: `own_tty` (this process's stderr is a terminal), `hint` (the
    HPCACCEL_TERMINAL value, None when unset), `launcher_tty` (whether mpirun's stderr is a
    terminal; None when unknown)."""
    if own_tty:
        return True
    if hint in ("0", "1"):
        return hint == "1"
    return bool(launcher_tty)


def terminal_behind(stream, env) -> bool:
    """Local. Whether the user's terminal shows what this process writes to `stream`."""
    try:
        own = bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        own = False
    hint = env.get(HINT)
    launcher = None if own or hint in ("0", "1") else mpirun_stderr_is_tty(env)
    return decide(own, hint, launcher)


def mpirun_stderr_is_tty(env, proc: str = "/proc") -> bool | None:
    """Whether the stderr of the Open MPI mpirun that started this process is a terminal;
    None where that cannot be known (not Open MPI, mpirun on another host, no /proc)."""
    match = re.search(r"/pid\.(\d+)(/|$)", env.get(SESSION_DIR, ""))
    if not match or int(match.group(1)) not in _ancestors(proc):
        return None
    try:
        return TTY_PATH.fullmatch(os.readlink(f"{proc}/{match.group(1)}/fd/2")) is not None
    except OSError:
        return None


def _ancestors(proc: str, limit: int = 64) -> set[int]:
    """The process ids above this one (parent, its parent, ...), from /proc/PID/stat."""
    found, pid = set(), os.getpid()
    while pid > 1 and len(found) < limit:
        try:
            with open(f"{proc}/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])  # the field after the name
        except (OSError, IndexError, ValueError):
            break
        found.add(pid)
    return found
