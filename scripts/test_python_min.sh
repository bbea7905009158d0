#!/usr/bin/env bash
# The unit tests under the oldest Python that pyproject.toml admits (requires-python), in a
# venv of its own in the user's cache, outside the checkout (made once per machine, then
# reused by every checkout: later runs take seconds plus the tests; the checkout itself is
# installed into it editable, again only when the checkout or its requirements change).
# Finds that Python under pyenv or on PATH; says so and exits 0 where there is none.
#
# torch for it: HPCACCEL_TORCH_MIN (default torch==2.8.0, the newest release with wheels for
# Python 3.9). PyPI's Linux wheel brings CUDA libraries (~3 GB download, once).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
min=$(sed -n 's/^requires-python = ">=\([0-9.]*\)".*/\1/p' pyproject.toml)
[ -n "$min" ] || { echo "test-python-min: no requires-python in pyproject.toml" >&2; exit 2; }
TORCH_SPEC=${HPCACCEL_TORCH_MIN:-torch==2.8.0}

py=""
for cand in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$min".*/bin/python "$(command -v "python$min" || true)"; do
  if [ -x "$cand" ] && "$cand" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$min'.split('.'))))"; then
    py=$cand
  fi
done
if [ -z "$py" ]; then
  echo "test-python-min: skipped, no Python $min found (pyenv install $min, or put python$min on PATH)"
  exit 0
fi

CACHE=${HPCACCEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcaccel}
venv="$CACHE/venv-py${min//./}-${TORCH_SPEC//[^A-Za-z0-9.]/_}"
base_stamp="$venv/.hpcaccel-base"
if [ "$(cat "$base_stamp" 2>/dev/null)" != "$TORCH_SPEC" ]; then
  echo "test-python-min: preparing $venv with $("$py" --version) and $TORCH_SPEC (once per machine)"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$TORCH_SPEC" "setuptools>=64"  # the build backend pyproject asks for
  echo "$TORCH_SPEC" > "$base_stamp"
fi
stamp="$venv/.hpcaccel-checkout"
want="$ROOT $(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q -e "$ROOT[test]"
  echo "$want" > "$stamp"
fi
echo "test-python-min: unit tests under $("$venv/bin/python" --version), $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)')"
exec timeout --signal=TERM --kill-after=30 900 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  -n "${TEST_WORKERS:-auto}" tests/unit "$@"
