#!/usr/bin/env bash
# Fresh machine -> installed environment -> lint -> the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
# Test files spread over PYTEST_WORKERS processes (pytest-xdist), each file whole on one worker so its
# module fixtures (builds, mostly) are made once: 13 min instead of 22 on 2 cores. PYTEST_WORKERS=0 runs
# everything in this process.
WORKERS=${PYTEST_WORKERS:-2}
if [ "$WORKERS" = "0" ]; then
  python -m pytest -q "$@"
else
  python -m pytest -q -n "$WORKERS" --dist loadfile "$@"
fi
