#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the CPU/dev requirements plus this package (editable).
# Sourced by examples/demo.sh and tests/run_tests.sh; idempotent and quick when already set up.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PY" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
. "$ROOT/.venv/bin/activate"
STAMP="$ROOT/.venv/.requirements.sha"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha1sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  python -m pip install -q --upgrade pip
  # torch first, pinned, so nothing pulls a CUDA build
  python -m pip install -q "$(grep -E '^torch==' "$ROOT/requirements.txt")"
  python -m pip install -q -r "$ROOT/requirements.txt"
  python -m pip install -q --no-deps --no-build-isolation -e "$ROOT" 2>/dev/null \
    || python -m pip install -q --no-deps -e "$ROOT"
  echo "$WANT" > "$STAMP"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
