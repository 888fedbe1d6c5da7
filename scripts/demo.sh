#!/usr/bin/env bash
# The main job: a real ComfyUI with this pack runs the heat-map workflow (example_workflows/api/txt2img_heatmaps.json)
# headlessly and writes its outputs to a folder.
#   scripts/demo.sh [--checkpoint PATH.safetensors] [--out DIR] [--workflow NAME] [--prompt TEXT] [--words a,b]
#                   [--steps N] [--size PX]
# Without --checkpoint a random-weight SD1.5-shaped checkpoint is written on the spot (nothing can be downloaded).
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
host_out="$(bash "$here/setup_host.sh")"
source "$here/env.sh"
COMFYUI_DIR="$(sed -n 's/^COMFYUI_DIR=//p' <<<"$host_out" | tail -n 1)"
export COMFYUI_DIR
exec "$PY" "$here/run_workflow.py" "$@"
