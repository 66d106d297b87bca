#!/usr/bin/env bash
# The whole test suite, as CI runs it: lint, types, then the tests (lab tests need root).
# Extra arguments go to pytest. pytest's "no tests ran" (exit 5) is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=.venv/bin
[ -x "$venv/pytest" ] || { echo "ci/test.sh: run ci/setup.sh first" >&2; exit 2; }

"$venv/ruff" check . || exit 1
"$venv/ruff" format --check . || exit 1
"$venv/mypy" || exit 1

"$venv/pytest" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "ci/test.sh: pytest collected no tests: that is a failure, not a pass" >&2
    exit 1
fi
exit "$rc"
