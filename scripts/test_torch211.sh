#!/usr/bin/env bash
# The oldest torch distrib accepts (2.11, what the GPU images run) in a venv of its own,
# .venv-torch211 (or $VENV), beside the main suite's 2.13: the tests most bound to torch's
# version. Extra arguments go to pytest, e.g. scripts/test_torch211.sh -x.
#
# Subset (about 13 min of tests on two cores, 15 min with a fresh venv): tests/unit (the
# checkpoint unit tests among them), the native parity layouts (tests/distributed/test_parity.py:
# FSDP2, TP, PP, HSDP), the pipeline schedules (test_pipeline.py), checkpoint resilience
# (test_resilience.py: DCP background saves, resharding, restarts), the DeepSpeed engine
# (test_deepspeed.py), expert parallelism (test_expert_parallel.py: torch 2.11's pipeline
# infers shapes on meta tensors, 2.13's on real ones) and LoRA under FSDP2 and TP
# (test_lora_parallel.py: its TP styles extend torch's private _partition_linear_fn) and
# context-parallel attention (test_context_attention.py: P2P ring and functional all-to-all)
# and fault-tolerant replica groups on torchft against DDP (test_sync_modes.py, one test).
# The planner's unit tests run here too (torch's fake process group). Left to the main suite on 2.13: the other distributed tests,
# integration, launchers and Slurm.
#
# PyPI has only the CUDA build of torch 2.11 for Linux: it brings about 4 GB of CUDA libraries
# (the venv is about 5.5 GB; about 75 s to install from the local mirror) and runs on the CPU
# here. DeepSpeed's C++ ops (shared-memory comm, CPU Adam) are built once for this torch, into
# ~/.cache/torch_extensions/py311_cu130 (about 45 s each on two idle cores).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-torch211}
TORCH=2.11.0
PY=${PYTHON:-python3}
export CI=${CI:-true}

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "test_torch211: $("$PY" --version 2>&1) is too old; distrib needs Python >= 3.11" >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# A constraint, so that installing distrib never swaps this torch for a newer one.
echo "torch==$TORCH" > "$VENV/torch-constraint.txt"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH')" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q -c "$VENV/torch-constraint.txt" "torch==$TORCH"
fi
"$VENV/bin/python" -m pip install -q -c "$VENV/torch-constraint.txt" -e ".[dev]"
echo "test_torch211: ready in $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"

exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=10 \
  tests/unit \
  tests/distributed/test_parity.py \
  tests/distributed/test_pipeline.py \
  tests/distributed/test_resilience.py \
  tests/distributed/test_deepspeed.py \
  tests/distributed/test_expert_parallel.py \
  tests/distributed/test_lora_parallel.py \
  tests/integration/test_streaming.py \
  tests/distributed/test_context_attention.py \
  tests/launch/test_sync_modes.py::test_every_step_and_local_sgd_h1_equal_data_parallelism \
  "$@"
