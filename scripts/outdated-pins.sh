#!/usr/bin/env bash
# The periodic check of the pinned versions: which packages the registry now serves newer than
# constraints.txt pins (every CI run prints it after the tests; it never fails a run). When a direct
# dependency has moved, run scripts/update-constraints.sh, which moves the pins only through a passing suite.
set -uo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python - <<'PY'
import json
import subprocess
import sys

try:
    out = subprocess.run([sys.executable, "-m", "pip", "list", "--outdated", "--format=json",
                          "--disable-pip-version-check"], capture_output=True, text=True, timeout=300).stdout
    rows = json.loads(out or "[]")
except (subprocess.SubprocessError, json.JSONDecodeError) as exc:
    print(f"outdated pins: could not ask the registry ({exc}); nothing to report")
    raise SystemExit(0)
if not rows:
    print("outdated pins: every pinned package is the newest the registry serves")
    raise SystemExit(0)
print(f"outdated pins: {len(rows)} package(s) newer on the registry than constraints.txt pins "
      "(move them with scripts/update-constraints.sh):")
for row in sorted(rows, key=lambda r: r["name"].lower()):
    print(f"  {row['name']:<24} pinned {row['version']:<14} newest {row['latest_version']}")
PY
exit 0
