#!/usr/bin/env bash
# Install mach_lightning (editable), its test tools and the `publish` extra into the current Python
# environment: the active virtualenv (README: python -m venv .venv && . .venv/bin/activate).
# torch: an installed torch is kept when it satisfies pyproject.toml's bound (GPU users bring
# their own); otherwise a GPU machine (nvidia-smi present) gets PyPI's default CUDA build and a CPU
# machine a CPU build: a local wheel if pip's find-links has one, else PyTorch's CPU index. Never
# a CUDA build on CPU: the editable install below finds torch satisfied and leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_REQ=$(grep -o '"torch[^"]*"' pyproject.toml | head -n 1 | tr -d '"')  # e.g. torch>=2.13,<3
step() { echo "setup: $*"; }

step "[1/3] environment: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
# A venv, or a conda env (whose prefix is its base prefix). CI runs as root without either, so
# this warns and goes on.
IN_ENV='import os, sys; sys.exit(sys.prefix == sys.base_prefix and not os.getenv("CONDA_PREFIX"))'
if ! "$PY" -c "$IN_ENV"; then
    prefix=$("$PY" -c 'import sys; print(sys.prefix)')
    echo "setup: warning: no virtualenv is active, so this installs into $prefix" >&2
    echo "setup: warning: to keep it apart: python -m venv .venv && . .venv/bin/activate" >&2
fi

# Exit 0 when the installed torch satisfies TORCH_REQ (pip's own parser: pip is always there).
torch_ok() {
    "$PY" - "$TORCH_REQ" 2>/dev/null <<'EOF'
import sys
from importlib.metadata import version

from pip._vendor.packaging.requirements import Requirement

sys.exit(not Requirement(sys.argv[1]).specifier.contains(version("torch"), prereleases=True))
EOF
}

installed=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if torch_ok; then
    step "[2/3] torch: keeping the installed $installed ($TORCH_REQ)"
else
    [ -n "$installed" ] && step "[2/3] torch: the installed $installed is outside $TORCH_REQ"
    if command -v nvidia-smi >/dev/null 2>&1; then
        step "[2/3] torch: installing $TORCH_VERSION from PyPI (CUDA build: this machine has GPUs)"
        "$PY" -m pip install "torch==$TORCH_VERSION"
    elif "$PY" -m pip install --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
        step "[2/3] torch: installed $TORCH_VERSION (CPU) from a local wheel"
    else
        step "[2/3] torch: installing $TORCH_VERSION from PyTorch's CPU index (about 200 MB)"
        "$PY" -m pip install "torch==$TORCH_VERSION" \
            --index-url https://download.pytorch.org/whl/cpu \
            --extra-index-url https://pypi.org/simple
    fi
fi

# Resolves torch's own dependencies too (a local wheel above went in without them).
step "[3/3] mach_lightning (editable) with its dependencies, test tools and the publish extra"
"$PY" -m pip install -e ".[test,publish,tensorboard]"
step "done: python -m mach_lightning.fit --config configs/seq.yaml  (or: mach-fit ...)"
