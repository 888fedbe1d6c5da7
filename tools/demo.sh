#!/usr/bin/env bash
# The main job: a real ComfyUI with this pack runs a heat-map workflow headlessly and writes its outputs to a folder:
# example_workflows/api/shapes_heatmaps.json (the shipped shapes model, no checkpoint) by default, or
# txt2img_heatmaps.json with --checkpoint.
#   tools/demo.sh [--checkpoint PATH.safetensors] [--out DIR] [--workflow NAME] [--prompt TEXT] [--words a,b]
#                   [--steps N] [--size PX]
# A checkpoint workflow named without --checkpoint gets a random-weight SD1.5-shaped checkpoint written on the spot.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
host_out="$(bash "$here/setup_host.sh")"
source "$here/env.sh"
COMFYUI_DIR="$(sed -n 's/^COMFYUI_DIR=//p' <<<"$host_out" | tail -n 1)"
export COMFYUI_DIR
exec "$PY" "$here/run_workflow.py" "$@"
