#!/usr/bin/env bash
# The main job on a fresh machine: install, prepare the default corpus (the Python standard
# library), train the debug model on CPU with two data-parallel processes (FSDP), then print a
# sample of what it learned.
# Extra arguments are config overrides for both steps, e.g. --training.steps=50.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${VENV:-.venv}
CONFIG=${CONFIG:-configs/debug.toml}
"$VENV/bin/distrib" prepare --config "$CONFIG" "$@"
# Two processes on one machine (gloo on CPU, nccl on GPUs); NPROC=1 trains in one process.
"$VENV/bin/torchrun" --standalone --nproc_per_node "${NPROC:-2}" -m distrib.cli train --config "$CONFIG" "$@"
RUN_DIR=$("$VENV/bin/python" -c "from distrib.config import load_config; import sys; print(load_config(sys.argv[1], sys.argv[2:]).job.run_dir)" "$CONFIG" "$@")
echo "--- a sample from $RUN_DIR ---"
"$VENV/bin/distrib" generate --run_dir "$RUN_DIR" --prompt "def " --max_new_tokens 96
