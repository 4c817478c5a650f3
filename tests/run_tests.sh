#!/usr/bin/env bash
# Set up (if needed) and run the whole CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. tools/setup_env.sh
python -m pytest -q --durations=25 tests "$@"
