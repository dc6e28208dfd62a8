#!/usr/bin/env bash
# Runs pytest from the venv; "no tests collected" (exit 5) is a failure, not a pass.
# The 25 slowest steps are listed at the end: where the suite's time goes.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest --durations=25 "$@"
rc=$?
if [ "$rc" = 5 ]; then
    echo "pytest collected no tests: failing on purpose" >&2
    exit 1
fi
exit "$rc"
