#!/usr/bin/env bash
# Build a real Stable Diffusion WebUI Forge for the Forge tests, cached under $DAAM_CACHE:
#   $DAAM_CACHE/forge-<commit>/      the source, unpacked from the shared archive (sha256 checked)
#   $DAAM_CACHE/forge-venv/          Forge's own venv (its pins differ from the project's venv)
# Idempotent: each step is skipped when its result is already there (the venv step keeps a stamp of its inputs).
# Its only stdout lines are FORGE_DIR=<path> and FORGE_PY=<path> (progress goes to stderr).
# Environment:
#   DAAM_CACHE     cache root (default ~/.cache/comfyui-daam)
#   FORGE_ARCHIVE  the source archive (default: shared/hosts/forge/forge-dfdcbab6.tar.gz next to the checkout,
#                  then /work/shared/hosts/forge/)
#   FORGE_PYTHON   interpreter for the venv (default python3; Forge's pins have wheels for 3.10 and 3.11)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DAAM_CACHE="${DAAM_CACHE:-$HOME/.cache/comfyui-daam}"
FORGE_COMMIT="dfdcbab6"
FORGE_SHA256="e6a01f933bf6fb876f33688d074e78743c942b90d6662f358ef7e5c6b8ccaf27"
FORGE_DIR="$DAAM_CACHE/forge-$FORGE_COMMIT"
FORGE_VENV="$DAAM_CACHE/forge-venv"
FORGE_PY="$FORGE_VENV/bin/python"
# Forge pins setuptools==69.5.1; these torch/torchvision releases accept it (newer ones make pip backtrack).
FORGE_TORCH="${FORGE_TORCH:-torch==2.12.1 torchvision==0.27.1}"

log() { echo "[setup_forge] $*" >&2; }

find_archive() {
    local name="forge-$FORGE_COMMIT.tar.gz" c
    for c in "${FORGE_ARCHIVE:-}" "$repo/../shared/hosts/forge/$name" "$repo/../../shared/hosts/forge/$name" \
             "/work/shared/hosts/forge/$name"; do
        if [[ -n "$c" && -f "$c" ]]; then echo "$c"; return 0; fi
    done
    log "Forge source archive $name not found; set FORGE_ARCHIVE"
    return 1
}

mkdir -p "$DAAM_CACHE"

# 1. Source
if [[ ! -f "$FORGE_DIR/launch.py" ]]; then
    archive="$(find_archive)"
    log "checking $archive"
    echo "$FORGE_SHA256  $archive" | sha256sum -c --quiet - >&2 || { log "sha256 mismatch for $archive"; exit 1; }
    log "unpacking to $FORGE_DIR"
    partial="$FORGE_DIR.partial.$$"
    trap 'rm -rf "$partial"' EXIT
    mkdir -p "$partial"
    tar -xzf "$archive" -C "$partial"
    [[ -f "$partial/forge/launch.py" ]] || { log "$archive has no forge/launch.py"; exit 1; }
    rm -rf "$FORGE_DIR"
    mv "$partial/forge" "$FORGE_DIR"
    rm -rf "$partial"
    trap - EXIT
fi

# 2. Venv
if [[ ! -x "$FORGE_PY" ]]; then
    log "creating venv $FORGE_VENV"
    "${FORGE_PYTHON:-python3}" -m venv "$FORGE_VENV"
fi
reqs="$FORGE_VENV/forge-requirements.txt"
# Its torch line goes (installed pinned below); the file has CRLF line endings. joblib is imported by a built-in
# extension but not listed; requests by the tests' API client.
tr -d '\r' < "$FORGE_DIR/requirements_versions.txt" | sed -E '/^torch[[:space:]]*(#.*)?$/d' > "$reqs.new"
printf '%s\n' joblib requests pytest >> "$reqs.new"
mv "$reqs.new" "$reqs"
stamp="$FORGE_VENV/.daam-stamp"
want="$( (cat "$reqs"; echo "$FORGE_TORCH") | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    log "installing $FORGE_TORCH and Forge's requirements (a few minutes)"
    # shellcheck disable=SC2086
    "$FORGE_PY" -m pip install --disable-pip-version-check -q $FORGE_TORCH -r "$reqs" >&2
    "$FORGE_PY" -c "import torch, torchvision, gradio, transformers, safetensors" >&2
    echo "$want" > "$stamp"
fi

echo "FORGE_DIR=$FORGE_DIR"
echo "FORGE_PY=$FORGE_PY"
