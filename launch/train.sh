#!/usr/bin/env bash
# Train under torchrun on this node: one node alone, or one node of several.
#
#   [NGPU=8] [NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500] \
#   [CONFIG=configs/llama3_8b.toml] [MAX_RESTARTS=3] launch/train.sh [--max-restarts N] [--section.key=value ...]
#
# Environment (all optional):
#   NGPU           processes on this node (default: the GPUs nvidia-smi lists, 2 without any)
#   NNODES         nodes in the job (default 1)
#   NODE_RANK      this node's index, 0..NNODES-1, for the static rendezvous (default 0)
#   MASTER_ADDR    static rendezvous: address of node 0, where rank 0 listens
#   MASTER_PORT    its port (default 29500)
#   RDZV_ENDPOINT  host:port of a c10d rendezvous instead (elastic; node ranks assigned on join)
#   RDZV_ID        the c10d rendezvous id, the same on every node (default distrib)
#   CONFIG         TOML config (default configs/debug.toml)
#   MAX_RESTARTS   times torchrun restarts a failed worker group (default 0); each restart
#                  resumes from the newest checkpoint (checkpoint.resume = auto)
#   LOG_DIR        per-rank logs (default <job.run_dir>/logs/node<NODE_RANK>)
#   TORCHRUN_ARGS  extra torchrun flags, split on spaces
#   PYTHON         interpreter (default .venv/bin/python when present, else python3)
# Arguments are config overrides. Paths are relative to the repository root, as in quickstart.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$VENV/bin/python" ]; then PYTHON=$VENV/bin/python; else PYTHON=python3; fi
fi
CONFIG=${CONFIG:-configs/debug.toml}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MAX_RESTARTS=${MAX_RESTARTS:-0}
# torchrun's own spelling works too: --max-restarts=N or --max-restarts N, before the overrides.
case "${1:-}" in
  --max-restarts=*) MAX_RESTARTS=${1#*=}; shift ;;
  --max-restarts) MAX_RESTARTS=${2:?--max-restarts needs a number}; shift 2 ;;
esac

if [ -z "${NGPU:-}" ]; then
  NGPU=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    NGPU=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
  fi
  # No GPU: two CPU processes (gloo), as the quick start runs.
  [ "$NGPU" -gt 0 ] || NGPU=2
fi

# Loading the config here also validates it (exit 2 with a message) before any process starts.
RUN_DIR=$("$PYTHON" -c 'import sys
from distrib.config import load_config
from distrib.errors import UserError
try:
    print(load_config(sys.argv[1], sys.argv[2:]).job.run_dir)
except UserError as err:
    sys.exit(f"launch/train.sh: error: {err}")' "$CONFIG" "$@") || exit 2
LOG_DIR=${LOG_DIR:-$RUN_DIR/logs/node$NODE_RANK}
mkdir -p "$LOG_DIR"

if [ -n "${RDZV_ENDPOINT:-}" ]; then
  RDZV=(--rdzv-backend=c10d "--rdzv-endpoint=$RDZV_ENDPOINT" "--rdzv-id=${RDZV_ID:-distrib}")
elif [ -n "${MASTER_ADDR:-}" ]; then
  RDZV=("--master-addr=$MASTER_ADDR" "--master-port=${MASTER_PORT:-29500}" "--node-rank=$NODE_RANK")
elif [ "$NNODES" -eq 1 ]; then
  # One node: a local c10d rendezvous on a free port, so concurrent runs never collide.
  RDZV=(--standalone)
else
  echo "launch/train.sh: NNODES=$NNODES needs MASTER_ADDR (and MASTER_PORT) or RDZV_ENDPOINT" >&2
  exit 2
fi

# With the c10d rendezvous, torchrun's workers share the agent's TCPStore across restarts by
# default, and a restarted group then reads the previous attempt's (dead) peer addresses: gloo
# fails with "Connection refused" (pytorch/pytorch#135712, #167288). A store per attempt avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# Every rank's stdout and stderr go to LOG_DIR/<run id>/attempt_<n>/<local rank>/; only local
# rank 0 is also shown here, so the console reads like one process.
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of flags on purpose
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc-per-node="$NGPU" "${RDZV[@]}" \
  --max-restarts="$MAX_RESTARTS" \
  --log-dir="$LOG_DIR" --redirects=3 --tee=3 --local-ranks-filter=0 \
  ${TORCHRUN_ARGS:-} \
  -m distrib.cli train --config "$CONFIG" "$@"
