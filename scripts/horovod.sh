#!/usr/bin/env bash
# Build (once per machine) and install Horovod into the venv.
#
# Horovod 0.28.1 is PyPI's newest release and ships only as an sdist. As released it
# asks CMake for C++14, but PyTorch >= 2.1 headers require C++17, so the build fails.
# Upstream fixed this on master (horovod PR #3998) but never released it. We apply the
# same two-line change (CMAKE_CXX_STANDARD 14 -> 17) to the released sdist and build a
# wheel with --no-build-isolation, so it compiles against the torch already in the venv.
#
# The wheel is cached outside the repo, keyed by Horovod, torch, Python and MPI versions
# (and GPU operations where the torch is a CUDA build): a wheel built for one torch must
# never be loaded by another. A failed build is remembered per key (a marker file naming
# its log) and not retried until HPCACCEL_RETRY_HOROVOD=1 (`make horovod-retry`); set-up
# continues and `--backend auto` falls back to the mpi4py reducer.
#
# Usage: scripts/horovod.sh PYTHON      (PYTHON: the venv's interpreter)
# Environment: HPCACCEL_CACHE, HPCACCEL_HOROVOD_VERSION, HPCACCEL_SKIP_HOROVOD=1,
# HPCACCEL_RETRY_HOROVOD=1, and Horovod's own HOROVOD_GPU_OPERATIONS, HOROVOD_CMAKE.
set -uo pipefail

PY=${1:?usage: horovod.sh PYTHON}
VENV_BIN=$(dirname "$PY")
HVD_VERSION=${HPCACCEL_HOROVOD_VERSION:-0.28.1}
CACHE=${HPCACCEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcaccel}

if [ "${HPCACCEL_SKIP_HOROVOD:-0}" = 1 ]; then
  echo "setup: Horovod skipped (HPCACCEL_SKIP_HOROVOD=1); backend auto will use the mpi4py reducer"
  exit 0
fi

# --- CPU or GPU operations. Horovod's CMake adds CUDA whenever the torch is a CUDA build
# and torch can name a CUDA_HOME (even just an `nvcc` on PATH), then fails without a full
# toolkit ("Could NOT find CUDAToolkit"). PyPI's Linux torch is a CUDA build, so a CPU node
# meets this. We ask for GPU operations only where they can work: the user asked
# (HOROVOD_GPU_OPERATIONS), or the torch is a CUDA build, a toolkit's nvcc runs and a GPU
# is there. Everything else builds CPU operations, whatever the torch.
has_gpu() { nvidia-smi -L >/dev/null 2>&1 || [ -e /dev/nvidia0 ]; }
has_toolkit() {
  local nvcc=${CUDA_HOME:+$CUDA_HOME/bin/nvcc}
  nvcc=${nvcc:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
  "$nvcc" --version >/dev/null 2>&1 && [ -e "$(dirname "$nvcc")/../include/cuda_runtime.h" ]
}
gpu_possible=0; has_toolkit && has_gpu && gpu_possible=1

# One interpreter start tells all (importing torch takes seconds, and an installed Horovod
# is checked in the same process): torch's version as a key part, its CUDA version ("-"
# for a CPU build), Python's tag, the operations to build, and whether the Horovod in
# this venv already is the right one. Importing a Horovod built for another torch can
# crash the interpreter: then ask again without it.
probe() {
  "$PY" - "$HVD_VERSION" "${HOROVOD_GPU_OPERATIONS:-}" "$gpu_possible" "$1" <<'PYEOF' 2>/dev/null
import sys, torch
version, user_ops, gpu_possible, check = sys.argv[1:]
cuda = torch.version.cuda
ops = "gpu-" + user_ops if user_ops else ("gpu" if cuda and gpu_possible == "1" else "cpu")
ready = 0
if check == "check":
    try:
        import horovod, horovod.torch as hvd
        ready = int(hvd.mpi_built() and horovod.__version__ == version
                    and (ops == "cpu" or hvd.cuda_built() or hvd.rocm_built()))
    except Exception:
        pass
print(torch.__version__.replace("+", "_"), cuda or "-", "cp%d%d" % sys.version_info[:2], ops, ready)
PYEOF
}
info=$(probe check) || info=$(probe no-check)
read -r torch_v torch_cuda py_v ops ready <<< "$info"
if [ -z "${ops:-}" ]; then
  echo "setup: WARNING: $PY cannot import torch; Horovod not built" >&2
  exit 0
fi
[ "$torch_cuda" = - ] && torch_cuda=""
case $ops in
  cpu) ops_label="CPU operations only" ;;
  gpu) ops_label="GPU operations (CUDA)" ;;
  *) ops_label="GPU operations (HOROVOD_GPU_OPERATIONS=$HOROVOD_GPU_OPERATIONS)" ;;
esac

if [ "$ready" = 1 ]; then
  echo "setup: Horovod $HVD_VERSION already installed (MPI built, $ops_label)"
  exit 0
fi

mpi_v=$(mpirun --version 2>/dev/null | head -n1 | sed 's/^mpirun *//' | tr -cs 'A-Za-z0-9.' '_' | sed 's/^_//; s/_$//')
key="horovod-${HVD_VERSION}_torch-${torch_v}_${py_v}_${mpi_v:-unknown-mpi}"
# A CPU torch can only give CPU operations: its key stays as it always was (existing
# caches stay valid); a CUDA torch or an explicit request names the operations.
if [ -n "$torch_cuda" ] || [ "$ops" != cpu ]; then key="${key}_${ops}-ops"; fi
wheel_dir="$CACHE/wheels/$key"
failed_marker="$CACHE/failed/$key"
log="$CACHE/horovod-build-$key.log"

# The first lines that name the cause: CMake's and the compiler's errors, pip's own
# resolution errors; never pip's generic "subprocess-exited-with-error" tail.
first_errors() {
  awk '
    /subprocess-exited-with-error|This error originates from a subprocess|Failed building wheel|Failed to build|did not run successfully|exit code:/ { next }
    /CMake Error/ { left = 6 }
    !left && (/(^|[^A-Za-z_-])error:/ || /fatal error/ || /^ERROR: /) { left = 2 }
    left > 0 { print "  " $0; left--; if (++n >= 14) exit }
  ' "$1"
}

warn_failed() {
  echo "setup: WARNING: Horovod build failed for $key (log: $1). First errors:" >&2
  first_errors "$1" >&2
  echo "setup: backend auto will use the mpi4py reducer; --backend horovod will fail." \
       "docs/quickstart.md says what to do; HPCACCEL_RETRY_HOROVOD=1 (make horovod-retry) builds again." >&2
}

if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
  if [ -f "$failed_marker" ] && [ "${HPCACCEL_RETRY_HOROVOD:-0}" != 1 ]; then
    warn_failed "$(cat "$failed_marker")"
    echo "setup: (that build failed before; not retried)" >&2
    exit 0
  fi
  echo "setup: building Horovod $HVD_VERSION for $key ($ops_label; about 10 minutes on 2 cores, once per machine)"
  work=$(mktemp -d)
  mkdir -p "$CACHE/failed" "$wheel_dir"
  (
    set -e
    # CMake: Horovod 0.28.1 bundles gloo, whose CMake files declare compatibility with
    # CMake < 3.5; CMake 4 refuses them. CMAKE_POLICY_VERSION_MINIMUM=3.5 would make
    # CMake 4 pretend, but only for the policies it still knows: we pin the CMake 3
    # series that Horovod 0.28.1 was made for, in the venv, and name it explicitly so a
    # system CMake (older, or 4.x) on PATH cannot be picked instead. >=3.18: the
    # CUDAToolkit module a GPU build needs. HOROVOD_CMAKE set by the user still wins.
    "$PY" -m pip install -q --disable-pip-version-check "setuptools<81" wheel "cmake>=3.18,<4" \
      packaging psutil pyyaml cloudpickle cffi
    echo download > "$work/stage"
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
      "horovod==$HVD_VERSION" -d "$work"
    echo build > "$work/stage"
    tar -xzf "$work"/horovod-"$HVD_VERSION".tar.gz -C "$work"
    src="$work/horovod-$HVD_VERSION"
    # The fix: C++17, as PyTorch's headers require.
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
      "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
    if [ "$ops" = cpu ]; then
      # CPU operations against any torch: Horovod's FindPytorch decides "CUDA torch" from
      # torch.version.cuda and torch's guess of CUDA_HOME; tell it no.
      sed -i 's/print(True if ((torch.version.cuda is not None) and (CUDA_HOME is not None)) else False)/print(False)/' \
        "$src/cmake/Modules/FindPytorch.cmake"
      grep -q 'CUDA_HOME; print(False)' "$src/cmake/Modules/FindPytorch.cmake"
      unset HOROVOD_GPU HOROVOD_GPU_ALLREDUCE HOROVOD_GPU_ALLGATHER HOROVOD_GPU_BROADCAST \
            HOROVOD_GPU_ALLTOALL HOROVOD_GPU_REDUCESCATTER
    fi
    export HOROVOD_CMAKE=${HOROVOD_CMAKE:-$VENV_BIN/cmake}
    "$HOROVOD_CMAKE" --version | head -n1
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    MAKEFLAGS="-j$(nproc)" \
      "$PY" -m pip wheel -v --disable-pip-version-check --no-build-isolation --no-deps "$src" -w "$work/dist"
    mv "$work"/dist/horovod-*.whl "$wheel_dir"/
  ) >"$log" 2>&1
  rc=$?
  stage=$(cat "$work/stage" 2>/dev/null || echo prepare)
  rm -rf "$work"
  if [ $rc -ne 0 ]; then
    # Remember a failed build, not a failed download (no network now is not a reason to
    # give up on later runs, and it costs seconds to find out again).
    [ "$stage" = build ] && echo "$log" > "$failed_marker"
    warn_failed "$log"
    exit 0
  fi
  rm -f "$failed_marker"
fi

if "$PY" -m pip install -q --disable-pip-version-check "$wheel_dir"/horovod-*.whl; then
  echo "setup: Horovod $HVD_VERSION installed from $wheel_dir"
else
  echo "setup: WARNING: installing the cached Horovod wheel failed; backend auto will use the mpi4py reducer" >&2
fi
exit 0
