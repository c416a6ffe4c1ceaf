#!/usr/bin/env bash
# Create .venv (once) and install the suite's requirements into it: `bash tools/setup_env.sh` for running the tools,
# `bash tools/setup_env.sh --test` for the test suite too (requirements-test.txt), `--extras` for every optional
# package (requirements-extras.txt). Used by the README commands and .ci/run.
# torch is installed first and pinned: on these machines torch==2.13.0 is a local CPU wheel; an unpinned torch
# would pull a multi-GB CUDA build. On a GPU machine, install the torch build for your CUDA first instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
REQUIREMENTS=requirements.txt
case "${1:-}" in
  --test) REQUIREMENTS=requirements-test.txt ;;
  --extras) REQUIREMENTS=requirements-extras.txt ;;
  "") ;;
  *) echo "usage: bash tools/setup_env.sh [--test|--extras]" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/pip install -q --disable-pip-version-check -r "$REQUIREMENTS"
