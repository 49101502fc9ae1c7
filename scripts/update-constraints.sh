#!/usr/bin/env bash
# Move the pinned versions forward: install the project from its pyproject ranges alone (no constraints) into a
# fresh environment, run the whole suite there, and only if it passes rewrite constraints.txt from that
# environment. Run it every few weeks (or when a dependency ships a fix you need) and commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ENV=${ENV_DIR:-.venv-update}
rm -rf "$ENV"
"$PYTHON" -m venv "$ENV"
. "$ENV/bin/activate"
python -m pip install --quiet --disable-pip-version-check torch==2.13.0 numpy
python -m pip install --quiet --disable-pip-version-check -e ".[dev,ray]"
ruff check .
python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile
{
  grep '^#' constraints.txt
  python -m pip freeze --exclude-editable | grep -v '^-e' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt rewritten from an environment that passed the suite; review the diff and commit it"
