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
# With parallel.fault_tolerance = true (docs/fault-tolerance.md), each of the parallel.dp_replicate
# replica groups is a torchrun of its own, with its own rendezvous and restarts:
#   REPLICA_GROUP     run only this group here (one or more nodes per group: NNODES, MASTER_ADDR
#                     ... then describe that group's nodes); unset: every group on this node,
#                     NGPU split evenly between them
#   TORCHFT_LIGHTHOUSE  http://host:port of a running torchft lighthouse; unset: this script
#                     starts one on LIGHTHOUSE_PORT (default 29510) and stops it at the end
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
# It prints the replica groups (0 without fault tolerance), their minimum, and the run folder.
LAYOUT=$("$PYTHON" -c 'import sys
from distrib.config import load_config
from distrib.errors import UserError
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except UserError as err:
    sys.exit(f"launch/train.sh: error: {err}")
p = cfg.parallel
print(p.dp_replicate if p.fault_tolerance else 0, p.min_replica_groups, cfg.job.run_dir)' \
  "$CONFIG" "$@") || exit 2
read -r NGROUPS MIN_GROUPS RUN_DIR <<<"$LAYOUT"

if [ "$NGROUPS" -gt 0 ] && [ -z "${REPLICA_GROUP:-}" ] && [ "$NNODES" -gt 1 ]; then
  echo "launch/train.sh: with fault tolerance and NNODES=$NNODES, set REPLICA_GROUP on each node" \
    "(the nodes of one group share a rendezvous; each group is launched on its own)" >&2
  exit 2
fi

if [ "$NGROUPS" -gt 0 ] && [ -z "${REPLICA_GROUP:-}" ]; then
  # Every replica group on this node: each a torchrun with its own local rendezvous.
  RDZV=(--standalone)
elif [ -n "${RDZV_ENDPOINT:-}" ]; then
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
torchrun_command() { # processes per node, log folder: sets CMD, the overrides to follow
  mkdir -p "$2"
  # shellcheck disable=SC2206  # TORCHRUN_ARGS is a list of flags on purpose
  CMD=("$PYTHON" -m torch.distributed.run
    --nnodes="$NNODES" --nproc-per-node="$1" "${RDZV[@]}"
    --max-restarts="$MAX_RESTARTS"
    --log-dir="$2" --redirects=3 --tee=3 --local-ranks-filter=0
    ${TORCHRUN_ARGS:-}
    -m distrib.cli train --config "$CONFIG")
}
torchrun() { # processes per node, log folder, then the overrides
  torchrun_command "$1" "$2"
  shift 2
  "${CMD[@]}" "$@"
}

if [ "$NGROUPS" -eq 0 ]; then
  # This shell becomes torchrun: signals reach it directly, and its exit status is the script's.
  torchrun_command "$NGPU" "${LOG_DIR:-$RUN_DIR/logs/node$NODE_RANK}"
  exec "${CMD[@]}" "$@"
fi

# Fault tolerance: the lighthouse first (unless one runs elsewhere), then the replica groups.
if [ -z "${TORCHFT_LIGHTHOUSE:-}" ] && [ -n "${REPLICA_GROUP:-}" ]; then
  echo "launch/train.sh: REPLICA_GROUP=$REPLICA_GROUP needs TORCHFT_LIGHTHOUSE=http://host:port of" \
    "the lighthouse every group reaches (start one with: torchft_lighthouse --min_replicas" \
    "$MIN_GROUPS --bind [::]:29510)" >&2
  exit 2
fi
if [ -z "${TORCHFT_LIGHTHOUSE:-}" ]; then
  LIGHTHOUSE_PORT=${LIGHTHOUSE_PORT:-29510}
  LIGHTHOUSE=$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")/torchft_lighthouse
  [ -x "$LIGHTHOUSE" ] || LIGHTHOUSE=torchft_lighthouse
  mkdir -p "$RUN_DIR"
  # A dead group stops heartbeating within 5 s and the others go on without it; a group that
  # is still heartbeating gets join_timeout to reach the quorum.
  RUST_LOG=${RUST_LOG:-warn} "$LIGHTHOUSE" --bind "[::]:$LIGHTHOUSE_PORT" \
    --min_replicas "$MIN_GROUPS" --join_timeout_ms "${LIGHTHOUSE_JOIN_MS:-10000}" \
    --quorum_tick_ms 10 --heartbeat_timeout_ms 5000 >>"$RUN_DIR/lighthouse.log" 2>&1 &
  LIGHTHOUSE_PID=$!
  trap 'kill "$LIGHTHOUSE_PID" 2>/dev/null || true' EXIT
  export TORCHFT_LIGHTHOUSE=http://localhost:$LIGHTHOUSE_PORT
fi
export RUST_LOG=${RUST_LOG:-warn}  # torchft's own (Rust) logging: warnings and errors only

if [ -n "${REPLICA_GROUP:-}" ]; then
  DISTRIB_REPLICA_GROUP=$REPLICA_GROUP torchrun "$NGPU" \
    "${LOG_DIR:-$RUN_DIR/group$REPLICA_GROUP/logs/node$NODE_RANK}" "$@"
  exit
fi
if [ $((NGPU % NGROUPS)) -ne 0 ]; then
  echo "launch/train.sh: NGPU=$NGPU processes cannot be split evenly over $NGROUPS replica groups" >&2
  exit 2
fi
PER_GROUP=$((NGPU / NGROUPS))
# Each group its own GPUs: a slice of CUDA_VISIBLE_DEVICES, or of the GPUs nvidia-smi lists.
DEVICES=()
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -r -a DEVICES <<<"$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi >/dev/null 2>&1; then
  mapfile -t DEVICES < <(seq 0 $((NGPU - 1)))
fi
PIDS=()
for ((g = 0; g < NGROUPS; g++)); do
  (
    if [ "${#DEVICES[@]}" -gt 0 ]; then
      CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${DEVICES[*]:$((g * PER_GROUP)):$PER_GROUP}")
      export CUDA_VISIBLE_DEVICES
    fi
    DISTRIB_REPLICA_GROUP=$g torchrun "$PER_GROUP" "$RUN_DIR/group$g/logs/node$NODE_RANK" "$@"
  ) &
  PIDS+=($!)
done
STATUS=0
for pid in "${PIDS[@]}"; do
  wait "$pid" || STATUS=$?
done
exit "$STATUS"
