#!/usr/bin/env bash
# Create (or re-check) the virtual environment holding the REFERENCE implementation
# mkshing/svdiff-pytorch 0.2.0, used by benchmarks/anchors/svdiff_pytorch_anchor.py and by
# tests/fixtures/make_svdiff_pytorch_fixture.py. It lives OUTSIDE the repository and never
# mixes with the project's own venv (svdiff-pytorch needs diffusers 0.14 / transformers 4.27).
#
#   bash benchmarks/anchors/setup_svdiff_pytorch_env.sh        # venv at $SVDIFF_REF_VENV
#   SVDIFF_REF_VENV=/tmp/ref bash benchmarks/anchors/setup_svdiff_pytorch_env.sh
#
# Idempotent: an existing venv whose imports already work is left alone.
#
# Pins (checked on Python 3.11, CPU only):
#   torch==2.13.0 (CPU wheel), torchvision==0.28.0 (svdiff-pytorch depends on torchvision;
#   unpinned, pip takes the newest torchvision, which drags in torch 2.14 and ~3 GB of CUDA
#   wheels), svdiff-pytorch==0.2.0 (pins diffusers==0.14.0), huggingface_hub==0.13.4 (newer
#   hubs lack names diffusers 0.14 imports), transformers==4.27.3, accelerate==0.18.0,
#   setuptools==80.9.0 (accelerate 0.18 imports pkg_resources, removed from setuptools 81+).
#   numpy needs no pin: svdiff-pytorch's paths used here work with numpy 2.x.
set -euo pipefail

VENV="${SVDIFF_REF_VENV:-/work/venvs/svdiff-ref}"
PY="${PYTHON:-python3}"

check() {
    "$VENV/bin/python" - <<'PY' 2>/dev/null
import warnings
warnings.filterwarnings("ignore")
import torch, diffusers, transformers, svdiff_pytorch
from svdiff_pytorch import load_unet_for_svdiff, load_text_encoder_for_svdiff
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert diffusers.__version__ == "0.14.0", diffusers.__version__
assert transformers.__version__ == "4.27.3", transformers.__version__
print(f"svdiff-pytorch env OK: torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}")
PY
}

if [ -x "$VENV/bin/python" ] && check; then
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet torch==2.13.0 torchvision==0.28.0 \
    svdiff-pytorch==0.2.0 huggingface_hub==0.13.4 transformers==4.27.3 \
    accelerate==0.18.0 setuptools==80.9.0
check
