#!/usr/bin/env bash
# Run pytest (or .ci/run with --ci) while a CPU hog keeps one core busy: a test that passes
# alone but fails under load is a bug, in the code or in the test.
#
#   bash scripts/under_load.sh tests/deploy/test_multinode.py    # these tests
#   bash scripts/under_load.sh --ci                                       # the whole CI run
set -uo pipefail
cd "$(dirname "$0")/.."
yes > /dev/null &
hog=$!
trap 'kill $hog 2>/dev/null' EXIT
if [ "${1:-}" = "--ci" ]; then
    bash .ci/run
else
    .venv/bin/python -m pytest "$@"
fi
