#!/usr/bin/env bash
# Create (or reuse) the virtual environment of the reference library, castorini `daam` 0.2.0, at
# $DAAM_CACHE/bench-ref-venv (default ~/.cache/comfyui-daam/bench-ref-venv). Prints the venv's python on stdout.
#
# daam 0.2.0 pins (its requirements.txt): diffusers==0.21.2, transformers==4.30.2, accelerate==0.23.0, plus unpinned
# scikit-image, spacy, gradio, ftfy, pandas, numba, nltk, inflect, joblib. It does not list torch.
# What is installed here, and why:
#   - daam==0.2.0 with --no-deps (its extras are for the CLI, the gradio demo and spaCy syntax analyses);
#   - its pins diffusers==0.21.2, transformers==4.30.2, accelerate==0.23.0;
#   - huggingface_hub<0.26: diffusers 0.21.2 imports `cached_download`, removed from huggingface_hub 0.26;
#   - torch==2.14.1, the same torch as the project venv (daam does not pin one; same torch = fair timings);
#   - numpy<2: transformers 4.30.2 predates numpy 2;
#   - what `import daam` itself needs: spacy (imported at module level, no language model is needed for
#     `trace` and word maps), matplotlib, scipy, pillow; ftfy (used by the CLIP tokenizer when present: it is not).
# Idempotent: a stamp file holds the hash of this script; delete the venv to start over.
# Environment: DAAM_CACHE (cache root), DAAM_PYTHON (interpreter, default python3.11 or python3).
set -euo pipefail

DAAM_CACHE="${DAAM_CACHE:-$HOME/.cache/comfyui-daam}"
VENV="$DAAM_CACHE/bench-ref-venv"
PY="$VENV/bin/python"
STAMP="$VENV/.bench-ref-stamp"
log() { echo "[reference_env] $*" >&2; }

want="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && "$PY" -c "import daam" >/dev/null 2>&1; then
    echo "$PY"
    exit 0
fi

if [[ ! -x "$PY" ]]; then
    interp="${DAAM_PYTHON:-$(command -v python3.11 || command -v python3)}"
    log "creating $VENV with $interp"
    "$interp" -m venv "$VENV"
fi
pip_() { "$PY" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2; }

pip_ install -q "torch==2.14.1" || { log "torch 2.14.1 is not installable here; using the newest torch"; pip_ install -q torch; }
pip_ install -q "diffusers==0.21.2" "transformers==4.30.2" "accelerate==0.23.0" "huggingface_hub<0.26" \
    "numpy<2" "safetensors" "spacy" "matplotlib" "scipy" "pillow" "psutil"
pip_ install -q --no-deps "daam==0.2.0"

"$PY" - >&2 <<'EOF'
import daam, diffusers, transformers, torch, numpy
print("reference venv:", "daam", daam.__version__, "diffusers", diffusers.__version__, "transformers",
      transformers.__version__, "torch", torch.__version__, "numpy", numpy.__version__)
EOF
echo "$want" > "$STAMP"
echo "$PY"
