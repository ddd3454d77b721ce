#!/usr/bin/env bash
# Install distrib with its dev extras into .venv and run the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m pytest "$@"
