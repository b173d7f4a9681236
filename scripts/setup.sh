#!/usr/bin/env bash
# Install mach_lightning and its test tools into the current Python environment.
# torch: an installed torch is kept (GPU users bring their own); on a machine without one, a GPU
# machine (nvidia-smi present) gets PyPI's default CUDA build and a CPU machine gets a CPU build:
# a local wheel if pip's find-links has one, else PyTorch's CPU index. Never a CUDA build on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
elif "$PY" -m pip install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    echo "setup: installed torch $TORCH_VERSION from a local wheel"
else
    "$PY" -m pip install -q "torch==$TORCH_VERSION" \
        --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
fi
# Resolves torch's own dependencies too (the local wheel above went in without them).
"$PY" -m pip install -q -e ".[test]"
echo "setup: done"
