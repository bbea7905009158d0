#!/usr/bin/env bash
# Build (once per machine) and install Horovod into the venv.
#
# Horovod 0.28.1 is PyPI's newest release and ships only as an sdist. As released it
# asks CMake for C++14, but PyTorch >= 2.1 headers require C++17, so the build fails.
# Upstream fixed this on master (horovod PR #3998) but never released it. We apply the
# same two-line change (CMAKE_CXX_STANDARD 14 -> 17) to the released sdist and build a
# wheel with --no-build-isolation, so it compiles against the torch already in the venv.
#
# The wheel is cached outside the repo, keyed by Horovod, torch, Python and MPI versions:
# a wheel built for one torch must never be loaded by another. A failed build is reported
# and set-up continues: `--backend auto` then falls back to the mpi4py reducer.
#
# Usage: scripts/horovod.sh PYTHON      (PYTHON: the venv's interpreter)
set -uo pipefail

PY=${1:?usage: horovod.sh PYTHON}
HVD_VERSION=${HPCACCEL_HOROVOD_VERSION:-0.28.1}
CACHE=${HPCACCEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcaccel}

if [ "${HPCACCEL_SKIP_HOROVOD:-0}" = 1 ]; then
  echo "setup: Horovod skipped (HPCACCEL_SKIP_HOROVOD=1); backend auto will use the mpi4py reducer"
  exit 0
fi

if "$PY" - "$HVD_VERSION" <<'PYEOF' 2>/dev/null; then
import sys, horovod.torch as hvd
ok = hvd.mpi_built() and __import__("horovod").__version__ == sys.argv[1]
sys.exit(0 if ok else 1)
PYEOF
  echo "setup: Horovod $HVD_VERSION already installed (MPI built)"
  exit 0
fi

torch_v=$("$PY" -c 'import torch; print(torch.__version__.replace("+", "_"))')
py_v=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
mpi_v=$(mpirun --version 2>/dev/null | head -n1 | sed 's/^mpirun *//' | tr -cs 'A-Za-z0-9.' '_' | sed 's/^_//; s/_$//')
key="horovod-${HVD_VERSION}_torch-${torch_v}_${py_v}_${mpi_v:-unknown-mpi}"
wheel_dir="$CACHE/wheels/$key"

if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
  echo "setup: building Horovod $HVD_VERSION for $key (about 10 minutes on 2 cores, once per machine)"
  work=$(mktemp -d)
  log="$CACHE/horovod-build-$key.log"
  mkdir -p "$CACHE" "$wheel_dir"
  (
    set -e
    "$PY" -m pip install -q "setuptools<81" wheel cmake packaging psutil pyyaml cloudpickle cffi
    "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$work"
    tar -xzf "$work"/horovod-"$HVD_VERSION".tar.gz -C "$work"
    src="$work/horovod-$HVD_VERSION"
    # The fix: C++17, as PyTorch's headers require.
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
      "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    MAKEFLAGS="-j$(nproc)" \
      "$PY" -m pip wheel -q --no-build-isolation --no-deps "$src" -w "$work/dist"
    mv "$work"/dist/horovod-*.whl "$wheel_dir"/
  ) >"$log" 2>&1
  rc=$?
  rm -rf "$work"
  if [ $rc -ne 0 ]; then
    echo "setup: WARNING: Horovod build failed (log: $log; last lines below)." \
         "backend auto will use the mpi4py reducer; --backend horovod will fail." >&2
    tail -n 5 "$log" >&2
    exit 0
  fi
fi

if "$PY" -m pip install -q "$wheel_dir"/horovod-*.whl; then
  echo "setup: Horovod $HVD_VERSION installed from $wheel_dir"
else
  echo "setup: WARNING: installing the cached Horovod wheel failed; backend auto will use the mpi4py reducer" >&2
fi
exit 0
