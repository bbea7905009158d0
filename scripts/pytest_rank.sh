#!/usr/bin/env bash
# One MPI rank's pytest (pytest-mpi). Rank 0 prints; the others log to build/test-logs and
# print their log only if they fail, so a failure on any rank is visible.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
rank=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${SLURM_PROCID:-0}}}
size=${OMPI_COMM_WORLD_SIZE:-${PMI_SIZE:-${SLURM_NTASKS:-1}}}
args=(-m pytest -p no:cacheprovider --with-mpi -q "$@")
if [ "$rank" = 0 ]; then
  # make test's report of the slowest tests (scripts/test_report.py): rank 0's times
  if [ -n "${HPCACCEL_TEST_REPORTS:-}" ]; then
    args+=("--junitxml=$HPCACCEL_TEST_REPORTS/${HPCACCEL_TEST_REPORT_NAME:-mpi}-np$size-$$.xml")
  fi
  exec "$ROOT/.venv/bin/python" "${args[@]}"
fi
mkdir -p "$ROOT/build/test-logs"
log="$ROOT/build/test-logs/np$size-rank$rank-$$.log"  # $$: runs side by side keep apart
"$ROOT/.venv/bin/python" "${args[@]}" >"$log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  echo "---- rank $rank of $size failed (rc $rc); its output ($log):"
  tail -n 60 "$log"
else
  rm -f "$log"
fi
exit $rc
