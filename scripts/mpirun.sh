#!/usr/bin/env bash
# mpirun with the options this machine needs:  scripts/mpirun.sh NP command...
# Adds --oversubscribe only where the machine has fewer cores than NP, and allows Open MPI
# to run as root (containers, CI).
set -euo pipefail
NP=$1; shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$ROOT/.venv/bin/mpirun" ] && export PATH="$ROOT/.venv/bin:$PATH"
extra=()
# --progress auto: a rank's stderr is a pipe from mpirun wherever mpirun writes, so say here
# whether the user's terminal is behind ours (hpcaccel/terminal.py)
if [ -t 2 ]; then export HPCACCEL_TERMINAL=1; else export HPCACCEL_TERMINAL=0; fi
if mpirun --version 2>/dev/null | grep -q "Open MPI"; then
  extra+=(-x HPCACCEL_TERMINAL)  # to the ranks on other hosts too
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  # no InfiniBand/UCX on a laptop or CI box: skip their noisy probing
  export OMPI_MCA_btl=${OMPI_MCA_btl:-self,vader,tcp}
  slots=$(nproc)
  if [ "$NP" -gt "$slots" ]; then
    extra+=(--oversubscribe)
  fi
fi
exec mpirun -np "$NP" "${extra[@]}" "$@"
