#!/usr/bin/env bash
# Create .venv (once) and install the suite's requirements into it. Used by the README commands and .ci/run.
# torch is installed first and pinned: on these machines torch==2.13.0 is a local CPU wheel; an unpinned torch
# would pull a multi-GB CUDA build. On a GPU machine, install the torch build for your CUDA first instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
