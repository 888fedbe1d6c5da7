#!/usr/bin/env bash
# What the browser tests (tests/browser/) need, installed when missing; idempotent and quick when in place:
#   1. Debian's chromium (apt-get; Playwright's own browser downloads are not reachable here)
#   2. Playwright for Python in the project's venv
#   3. two frontends from PyPI, unpacked for --front-end-root: comfyui-frontend-package==1.27.10 (ComfyUI 0.3.64's pin)
#      and 1.58.1 (the newest)
# Prints CHROMIUM=<path>, DAAM_FRONTEND_1_27=<static folder> and DAAM_FRONTEND_1_58=<static folder> for the caller.
# Run after tools/setup_env.sh; uses the paths of tools/env.sh.
set -euo pipefail

here="$(dirname "${BASH_SOURCE[0]}")"
source "$here/env.sh"

log() { echo "[setup_browser] $*" >&2; }

chromium="$(command -v chromium || command -v chromium-browser || true)"
if [[ -z "$chromium" ]]; then
    log "installing chromium (apt-get)"
    sudo_=""
    [[ $(id -u) == 0 ]] || sudo_="sudo"
    $sudo_ apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq chromium >&2
    chromium="$(command -v chromium)"
fi

if ! "$PY" -c "import playwright.sync_api" >/dev/null 2>&1; then
    log "installing playwright into $DAAM_VENV"
    "$PY" -m pip --disable-pip-version-check install -q "playwright>=1.40" >&2
fi

unpack_frontend() {  # $1 version: comfyui-frontend-package from PyPI, its static folder under $DAAM_CACHE/frontends
    local version="$1" dir="$DAAM_CACHE/frontends/$1"
    [[ -f "$dir/static/index.html" ]] && return 0
    log "downloading comfyui-frontend-package==$version"
    mkdir -p "$DAAM_CACHE/dl" "$dir"
    "$PY" -m pip --disable-pip-version-check download -q --no-deps "comfyui-frontend-package==$version" \
        -d "$DAAM_CACHE/dl" >&2
    "$PY" - "$DAAM_CACHE/dl/comfyui_frontend_package-$version-py3-none-any.whl" "$dir" <<'PYEOF'
import sys, zipfile
from pathlib import Path
wheel, out = sys.argv[1], Path(sys.argv[2])
prefix = "comfyui_frontend_package/static/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = (out / "static" / name[len(prefix):]).resolve()
            if out.resolve() not in target.parents:
                raise SystemExit(f"unsafe path in wheel: {name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
PYEOF
}

unpack_frontend 1.27.10  # the frontend ComfyUI 0.3.64 pins
unpack_frontend 1.58.1   # the newest on PyPI (Dec 2026)

echo "CHROMIUM=$chromium"
echo "DAAM_FRONTEND_1_27=$DAAM_CACHE/frontends/1.27.10/static"
echo "DAAM_FRONTEND_1_58=$DAAM_CACHE/frontends/1.58.1/static"
