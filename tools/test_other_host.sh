#!/usr/bin/env bash
# The host-dependent tests on another ComfyUI source tree, e.g. 0.3.64, which no package index ships:
#   tools/test_other_host.sh SRC [pytest args...]
# SRC is a ComfyUI checkout or a bare git repository (its HEAD is exported; the search tool's `fetch` of
# Comfy-Org/ComfyUI gives one). The tree is copied to $DAAM_CACHE/ComfyUI-<version> with this pack linked into
# custom_nodes. Its Python is an overlay venv: the main venv's packages (through a .pth file, so torch is the
# one tools/setup_env.sh installed and never touched) under that tree's own requirements.txt (torch, torchvision
# and torchaudio lines dropped, the installed torch pinned by a constraints file). Without pytest arguments it
# runs the in-process, HTTP and browser tests.
set -euo pipefail

here="$(dirname "${BASH_SOURCE[0]}")"
src="${1:?usage: tools/test_other_host.sh SRC [pytest args...]}"
shift
bash "$here/setup_env.sh" >&2
source "$here/env.sh"
log() { echo "[test_other_host] $*" >&2; }

export_tree() {  # $1 source, $2 destination (absent)
    if [[ -f "$1/main.py" ]]; then
        cp -a "$1" "$2"
    else
        "$PY" "$here/export_git_head.py" "$1" "$2"  # a snapshot may lack its largest blobs: they are skipped
    fi
}

version_of() {  # the __version__ of a tree's comfyui_version.py
    sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py"
}

if [[ -f "$src/main.py" ]]; then
    version="$(version_of "$src")"
else
    version="$(git --git-dir="$src" show HEAD:comfyui_version.py | sed -n 's/^__version__ = "\(.*\)"/\1/p')"
fi
[[ -n "$version" ]] || { log "$src has no comfyui_version.py"; exit 1; }
host="$DAAM_CACHE/ComfyUI-$version"
if [[ ! -f "$host/main.py" ]]; then
    log "copying ComfyUI $version to $host"
    rm -rf "$host.partial"
    export_tree "$src" "$host.partial"
    mv "$host.partial" "$host"
fi
rm -f "$host/extra_model_paths.yaml"
link="$host/custom_nodes/comfyui-daam"
[[ ! -e "$link" || -L "$link" ]] || { log "$link exists and is not a symlink"; exit 1; }
ln -sfn "$DAAM_REPO" "$link"

venv="$DAAM_CACHE/venv-comfyui-$version"
reqs="$(grep -vE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([=<>!~;#].*)?$' "$host/requirements.txt")"
torch_pins="$("$PY" -c 'import importlib.metadata as m
for name in ("torch", "torchvision"):
    print(f"{name}=={m.version(name)}")')"
stamp="$(printf '%s\n%s\n%s\n' "$reqs" "$torch_pins" "$("$PY" -VV)" | cat - "$0" | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$venv/.daam-stamp" || "$(cat "$venv/.daam-stamp")" != "$stamp" ]]; then
    log "overlay venv $venv: the requirements of $host/requirements.txt"
    rm -rf "$venv"
    base="$("$PY" -c 'import sys; print(sys._base_executable)')"
    "$base" -m venv "$venv"
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/zz-daam-main-venv.pth"
    printf '%s\n' "$reqs" > "$venv/host-requirements.txt"
    printf '%s\n' "$torch_pins" > "$venv/torch-constraints.txt"
    # pip sees the main venv's packages through the .pth: those that satisfy a requirement stay where they are,
    # the others are installed into the overlay (pip does not uninstall outside the environment it runs in)
    "$venv/bin/python" -m pip install --disable-pip-version-check -q -c "$venv/torch-constraints.txt" \
        -r "$venv/host-requirements.txt" >&2
    if grep -qE '^[[:space:]]*torchaudio' "$host/requirements.txt" && ! "$venv/bin/python" -c 'import torchaudio' 2>/dev/null
    then  # comfy.sd imports it from 0.3.7x on; no release pins a torch this new, but its wheels use torch's stable
          # ABI, so the newest one works with it: installed without its torch pin
        "$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps torchaudio >&2
        "$venv/bin/python" -c 'import torchaudio' || log "torchaudio does not import: comfy.sd will not either"
    fi
    main_site="$(cat "$site/zz-daam-main-venv.pth")"
    torch_at="$("$venv/bin/python" -c 'import torch; print(torch.__file__)')"
    [[ "$torch_at" == "$main_site"/* ]] || { log "the overlay replaced torch ($torch_at)"; exit 1; }
    echo "$stamp" > "$venv/.daam-stamp"
fi

targets=(tests/test_comfy_nodes.py tests/test_comfy_dit.py tests/test_e2e_server.py tests/test_e2e_dit.py
         tests/browser)
for arg in "$@"; do
    if [[ "$arg" != -* && -e "$DAAM_REPO/${arg%%::*}" ]]; then
        targets=()
        break
    fi
done
cd "$DAAM_REPO"
export COMFYUI_DIR="$host"
log "ComfyUI $version at $host, python $venv/bin/python"
exec "$venv/bin/python" -m pytest -q ${targets[@]+"${targets[@]}"} "$@"
