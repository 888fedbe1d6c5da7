#!/usr/bin/env bash
# Build a real Stable Diffusion WebUI Forge for the Forge tests, cached under $DAAM_CACHE:
#   $DAAM_CACHE/forge-<commit>/      the source: unpacked from the shared archive (sha256 checked), or, where the
#                                    archive is not there, cloned at the same commit from the public repositories
#   $DAAM_CACHE/forge-venv/          Forge's own venv (its pins differ from the project's venv)
# Idempotent: each step is skipped when its result is already there (the venv step keeps a stamp of its inputs).
# Its only stdout lines are FORGE_DIR=<path> and FORGE_PY=<path> (progress goes to stderr).
# Environment:
#   DAAM_CACHE     cache root (default ~/.cache/comfyui-daam)
#   FORGE_ARCHIVE  the source archive (default: shared/hosts/forge/forge-dfdcbab6.tar.gz next to the checkout,
#                  then /work/shared/hosts/forge/); when none is found the source is cloned
#   FORGE_PYTHON   interpreter for the venv (default python3; Forge's pins have wheels for 3.10 and 3.11)
#   FORGE_GIT_URL, FORGE_HF_GUESS_URL, FORGE_ASSETS_URL, FORGE_BLIP_URL
#                  where the clone route takes Forge and the three repositories its launcher would clone
#                  (defaults: their public GitHub repositories); FORGE_COMMIT, FORGE_HF_GUESS_COMMIT,
#                  FORGE_ASSETS_COMMIT, FORGE_BLIP_COMMIT the commits (defaults: the archive's, below)
# Options: --source-only  stop after the source step (prints FORGE_DIR only).
set -euo pipefail

source_only=0
[[ "${1:-}" == "--source-only" ]] && source_only=1

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DAAM_CACHE="${DAAM_CACHE:-$HOME/.cache/comfyui-daam}"
FORGE_COMMIT="${FORGE_COMMIT:-dfdcbab6}"  # another commit has no archive: it is cloned
FORGE_GIT_URL="${FORGE_GIT_URL:-https://github.com/lllyasviel/stable-diffusion-webui-forge.git}"
# The repositories Forge's launcher clones into repositories/, at the commits its launch_utils.py pins.
FORGE_REPOSITORIES=(
    "huggingface_guess ${FORGE_HF_GUESS_URL:-https://github.com/lllyasviel/huggingface_guess.git} ${FORGE_HF_GUESS_COMMIT:-84826248b49bb7ca754c73293299c4d4e23a548d}"
    "stable-diffusion-webui-assets ${FORGE_ASSETS_URL:-https://github.com/AUTOMATIC1111/stable-diffusion-webui-assets.git} ${FORGE_ASSETS_COMMIT:-6f7db241d2f8ba7457bac5ca9753331f0c266917}"
    "BLIP ${FORGE_BLIP_URL:-https://github.com/salesforce/BLIP.git} ${FORGE_BLIP_COMMIT:-48211a1594f1321b00f14c9f7a5b4813144b2fb9}"
)
FORGE_SHA256="e6a01f933bf6fb876f33688d074e78743c942b90d6662f358ef7e5c6b8ccaf27"
FORGE_DIR="$DAAM_CACHE/forge-$FORGE_COMMIT"
FORGE_VENV="$DAAM_CACHE/forge-venv"
FORGE_PY="$FORGE_VENV/bin/python"
# Forge pins setuptools==69.5.1; these torch/torchvision releases accept it (newer ones make pip backtrack).
FORGE_TORCH="${FORGE_TORCH:-torch==2.12.1 torchvision==0.27.1}"

log() { echo "[setup_forge] $*" >&2; }

find_archive() {
    local name="forge-$FORGE_COMMIT.tar.gz" c candidates
    if [[ -n "${FORGE_ARCHIVE:-}" ]]; then
        candidates=("$FORGE_ARCHIVE")  # named: that file or none
    else
        candidates=("$repo/../shared/hosts/forge/$name" "$repo/../../shared/hosts/forge/$name"
                    "/work/shared/hosts/forge/$name")
    fi
    for c in "${candidates[@]}"; do
        if [[ -n "$c" && -f "$c" ]]; then echo "$c"; return 0; fi
    done
    return 1
}

# clone_at URL COMMIT DEST: a clone of URL with COMMIT checked out (a short hash is fine).
clone_at() {
    git clone --quiet "$1" "$3" >&2 && git -C "$3" -c advice.detachedHead=false checkout --quiet "$2" >&2
}

# The offline route's twin: Forge at $FORGE_COMMIT with its repositories/, laid out as the archive is.
clone_source() {
    local dest="$1" name url commit
    command -v git >/dev/null || { log "git is needed to clone Forge (or set FORGE_ARCHIVE)"; return 1; }
    log "cloning $FORGE_GIT_URL at $FORGE_COMMIT"
    clone_at "$FORGE_GIT_URL" "$FORGE_COMMIT" "$dest/forge" || { log "cloning $FORGE_GIT_URL failed"; return 1; }
    for entry in "${FORGE_REPOSITORIES[@]}"; do
        read -r name url commit <<<"$entry"
        log "cloning $url at $commit"
        clone_at "$url" "$commit" "$dest/forge/repositories/$name" || { log "cloning $url failed"; return 1; }
    done
}

mkdir -p "$DAAM_CACHE"

# 1. Source
if [[ ! -f "$FORGE_DIR/launch.py" ]]; then
    partial="$FORGE_DIR.partial.$$"
    trap 'rm -rf "$partial"' EXIT
    mkdir -p "$partial"
    if archive="$(find_archive)"; then
        log "checking $archive"
        echo "$FORGE_SHA256  $archive" | sha256sum -c --quiet - >&2 || { log "sha256 mismatch for $archive"; exit 1; }
        log "unpacking to $FORGE_DIR"
        tar -xzf "$archive" -C "$partial"
    else
        log "no Forge source archive (forge-$FORGE_COMMIT.tar.gz; FORGE_ARCHIVE names one): cloning instead"
        clone_source "$partial" || exit 1
    fi
    [[ -f "$partial/forge/launch.py" ]] || { log "the Forge source has no launch.py"; exit 1; }
    rm -rf "$FORGE_DIR"
    mv "$partial/forge" "$FORGE_DIR"
    rm -rf "$partial"
    trap - EXIT
fi

if [[ $source_only == 1 ]]; then
    echo "FORGE_DIR=$FORGE_DIR"
    exit 0
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
