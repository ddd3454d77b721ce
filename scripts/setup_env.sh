#!/usr/bin/env bash
# Create the virtual environment (.venv, or $VENV) and install distrib into it, editable.
# Usage: scripts/setup_env.sh [EXTRAS]   e.g. scripts/setup_env.sh dev
# torch is pinned to 2.13.0 here, the CPU path; on a GPU machine install your CUDA build of
# torch (>= 2.11) into the venv first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${1:-}
PY=${PYTHON:-python3}

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup_env: $("$PY" --version 2>&1) is too old; distrib needs Python >= 3.11 (set PYTHON=...)" >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
"$VENV/bin/python" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
echo "setup_env: ready in $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
