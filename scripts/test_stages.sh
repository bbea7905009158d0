#!/usr/bin/env bash
# make test: every stage in turn (each a make target), timed; all stages run even after one
# fails, so one run shows every failure. At the end: the stage times and the slowest tests
# (scripts/test_report.py, from each pytest's JUnit XML in build/test-reports), also saved to
# build/test-reports/summary.txt. Exit status: 0 only if every stage passed.
#   scripts/test_stages.sh STAGE...
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export HPCACCEL_TEST_REPORTS="$ROOT/build/test-reports"
rm -rf "$HPCACCEL_TEST_REPORTS"
mkdir -p "$HPCACCEL_TEST_REPORTS"
stages="$HPCACCEL_TEST_REPORTS/stages.tsv"
failed=()
for stage in "$@"; do
  echo "== make $stage"
  t0=$(date +%s%N)
  make --no-print-directory "$stage"
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s\t%d.%03d\t%d\n' "$stage" $((ms / 1000)) $((ms % 1000)) "$rc" >> "$stages"
  [ $rc -eq 0 ] || failed+=("$stage")
  if [ $rc -ne 0 ] && [ "$stage" = setup-test ]; then
    break  # nothing can be tested without the set-up
  fi
done
"$ROOT/.venv/bin/python" scripts/test_report.py "$HPCACCEL_TEST_REPORTS" \
  | tee "$HPCACCEL_TEST_REPORTS/summary.txt"
if [ ${#failed[@]} -gt 0 ]; then
  echo "make test: FAILED stage(s): ${failed[*]}" >&2
  exit 1
fi
echo "make test: every stage passed"
