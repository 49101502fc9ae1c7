#!/usr/bin/env bash
# Create .venv and install prune-export with its test tools, from scratch.
# The ray extra is installed too: the tests run distributed searches on a local Ray instance.
# torch==2.13.0 goes first: it is the CPU wheel; an unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# constraints.txt pins every package to the versions the suite passed with (scripts/update-constraints.sh moves them).
python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0 numpy
python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,ray]"
python -c "import torch, transformers, onnx, onnxruntime, polygraphy, click; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| onnx', onnx.__version__, '| onnxruntime', onnxruntime.__version__)"
