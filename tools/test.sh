#!/usr/bin/env bash
# The test command: sets up (or reuses) the venv and the ComfyUI host, then runs pytest in the venv.
#   tools/test.sh [pytest args...]   e.g. tools/test.sh tests/test_recorder.py -x
# Without a test path among the arguments it runs all of tests/.
set -euo pipefail

here="$(dirname "${BASH_SOURCE[0]}")"
host_out="$(bash "$here/setup_host.sh")"  # idempotent: a few seconds when everything is in place
source "$here/env.sh"
COMFYUI_DIR="$(sed -n 's/^COMFYUI_DIR=//p' <<<"$host_out" | tail -n 1)"
export COMFYUI_DIR
cd "$DAAM_REPO"

targets=(tests)
for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
        targets=()  # the caller named what to run
        break
    fi
done
exec "$PY" -m pytest -q ${targets[@]+"${targets[@]}"} "$@"
