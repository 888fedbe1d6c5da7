#!/usr/bin/env bash
# Run the test suite in the project's venv: scripts/test.sh [pytest args...]
# Without a test path among the arguments it runs all of tests/; `scripts/test.sh tests/test_x.py -x` runs one file.
# Set up first with scripts/setup_host.sh (it also runs setup_env.sh).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DAAM_REPO"

if [[ ! -x "$PY" ]]; then
    echo "no venv at $DAAM_VENV: run scripts/setup_host.sh first" >&2
    exit 2
fi
targets=(tests)
for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
        targets=()  # the caller named what to run
        break
    fi
done
exec "$PY" -m pytest -q ${targets[@]+"${targets[@]}"} "$@"
