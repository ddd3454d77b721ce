#!/usr/bin/env bash
# Submit a fault-tolerant run (parallel.fault_tolerance = true) to Slurm, as three jobs:
#   - the replica groups: slurm/train.sbatch as a job array, `--array=0-(G-1)` with G =
#     parallel.dp_replicate; task g trains group g on its own nodes (each sbatch option below
#     is per group), with its own rendezvous, and is requeued on its own when it fails or is
#     preempted; all groups write to one run folder, RUNS_DIR/slurm-ARRAYJOBID/group<g>;
#   - the torchft lighthouse (slurm/lighthouse.sbatch, one CPU), whose address the groups read
#     from RUN_DIR/lighthouse.addr; the groups start once it runs (--dependency=after);
#   - a cleanup job that cancels the lighthouse once every group has ended
#     (--dependency=afterany:ARRAY).
# Run it from the folder the runs should go to, as sbatch slurm/train.sbatch:
#
#   slurm/submit_ft.sh configs/ft.toml --parallel.dp_replicate=4 --training.steps=10000
#   slurm/submit_ft.sh -N 2 --gpus-per-node=8 --time=24:00:00 -- configs/ft.toml [overrides]
#
# Arguments: sbatch options for each group's job, ended by `--` (optional); then the config
# file (or env CONFIG) and `--section.key=value` overrides, as for slurm/train.sbatch.
# Environment: what slurm/train.sbatch reads (PYTHON, NPROC_PER_NODE, RUNS_DIR, MAX_RESTARTS,
# FT_REQUEUES, ...; sbatch passes it on), and
#   LIGHTHOUSE_SBATCH_ARGS  sbatch options of the lighthouse job, split on spaces (a partition,
#                           a --time that outlasts every group's requeues; default: none)
#   TORCHFT_LIGHTHOUSE      http://host:port of a lighthouse that runs already: submit only the
#                           groups
#   LIGHTHOUSE_JOIN_MS, LIGHTHOUSE_HEARTBEAT_MS, LIGHTHOUSE_PORT: see slurm/lighthouse.sbatch
# Prints, one per line: run_dir=..., groups=ARRAYJOBID, lighthouse=JOBID, cleanup=JOBID (the
# last two empty with TORCHFT_LIGHTHOUSE); what it submitted goes to stderr.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "${VENV:-.venv}/bin/python" ]; then PYTHON=${VENV:-.venv}/bin/python; else PYTHON=python3; fi
fi
RUNS_DIR=${RUNS_DIR:-runs}

die() {
    echo "submit_ft.sh: $*" >&2
    exit 2
}

SBATCH_OPTS=()
for arg in "$@"; do
    if [ "$arg" = -- ]; then
        while [ "$1" != -- ]; do SBATCH_OPTS+=("$1") && shift; done
        shift
        break
    fi
done
if [ $# -gt 0 ] && [[ $1 != --* ]]; then
    CONFIG=$1
    shift
fi
TRAIN_ARGS=()
[ -n "${CONFIG:-}" ] && TRAIN_ARGS+=("$CONFIG")
TRAIN_ARGS+=("$@")

# The replica groups and the quorum's minimum, from the config as the trainer will see it
# (which also validates it before anything is submitted).
LAYOUT=$("$PYTHON" -c 'import sys
try:
    from distrib.config import load_config
    from distrib.errors import UserError
except ImportError as err:
    sys.exit(f"submit_ft.sh: {sys.executable} cannot import distrib ({err}): set PYTHON")
try:
    cfg = load_config(sys.argv[1] or None, sys.argv[2:])
except UserError as err:
    sys.exit(f"submit_ft.sh: error: {err}")
p = cfg.parallel
print(p.dp_replicate if p.fault_tolerance else 0, p.min_replica_groups)' "${CONFIG:-}" "$@") ||
    exit 2
read -r NGROUPS MIN_GROUPS <<<"$(tail -n 1 <<<"$LAYOUT")"
[ "$NGROUPS" -gt 0 ] || die "the config does not set parallel.fault_tolerance = true; submit" \
    "it with sbatch slurm/train.sbatch"

CANCEL=()
# shellcheck disable=SC2317  # called from the trap below
undo() {
    if [ ${#CANCEL[@]} -gt 0 ]; then
        echo "submit_ft.sh: cancelling what was submitted: ${CANCEL[*]}" >&2
        scancel "${CANCEL[@]}" || true
    fi
}
trap undo ERR
submit() { # sbatch arguments; prints the job id
    local out
    out=$(sbatch --parsable "$@") || return 1
    echo "${out%%;*}"
}

# Held until the lighthouse is submitted: the run folder, which the lighthouse writes its address
# to, is named after the array's job id. (REPLICA_GROUP and LIGHTHOUSE_FILE of this shell would
# take the place of each task's own.)
GROUPS_JOB=$(REPLICA_GROUP="" LIGHTHOUSE_FILE="" submit --hold --array="0-$((NGROUPS - 1))" \
    --job-name=distrib-ft --output=slurm-%A_%a.out "${SBATCH_OPTS[@]}" "$HERE/train.sbatch" \
    "${TRAIN_ARGS[@]}")
CANCEL+=("$GROUPS_JOB")
RUN_DIR=$RUNS_DIR/slurm-$GROUPS_JOB
for ((i = 1; i <= $#; i++)); do
    case ${!i} in
    --job.run_dir=*) RUN_DIR=${!i#*=} ;;
    --job.run_dir) j=$((i + 1)) && RUN_DIR=${!j} ;;
    esac
done

LIGHTHOUSE_JOB=
CLEANUP_JOB=
if [ -z "${TORCHFT_LIGHTHOUSE:-}" ]; then
    mkdir -p "$RUN_DIR"
    rm -f "$RUN_DIR/lighthouse.addr" # a previous lighthouse's
    # shellcheck disable=SC2086  # LIGHTHOUSE_SBATCH_ARGS is a list of options on purpose
    LIGHTHOUSE_JOB=$(RUN_DIR=$RUN_DIR LIGHTHOUSE_FILE="" MIN_REPLICAS=$MIN_GROUPS submit \
        --job-name=distrib-ft-lighthouse ${LIGHTHOUSE_SBATCH_ARGS:-} "$HERE/lighthouse.sbatch")
    CANCEL+=("$LIGHTHOUSE_JOB")
    # The groups start once the lighthouse runs (they also wait for its address file).
    scontrol update JobId="$GROUPS_JOB" Dependency="after:$LIGHTHOUSE_JOB" ||
        echo "submit_ft.sh: could not make the groups wait for the lighthouse job to start;" \
            "they wait for its address file instead" >&2
    CLEANUP_JOB=$(submit --dependency="afterany:$GROUPS_JOB" --job-name=distrib-ft-cleanup \
        --ntasks=1 --time=5 --output=slurm-%j.out --wrap="scancel $LIGHTHOUSE_JOB")
    CANCEL+=("$CLEANUP_JOB")
fi
scontrol release "$GROUPS_JOB"
trap - ERR

if [ -n "$LIGHTHOUSE_JOB" ]; then
    LIGHTHOUSE_NOTE="lighthouse job $LIGHTHOUSE_JOB, cancelled by job $CLEANUP_JOB at the end"
else
    LIGHTHOUSE_NOTE="lighthouse at $TORCHFT_LIGHTHOUSE"
fi
echo "submit_ft.sh: $NGROUPS replica groups (quorum of at least $MIN_GROUPS) as job array" \
    "${GROUPS_JOB}_[0-$((NGROUPS - 1))], run folder $RUN_DIR; $LIGHTHOUSE_NOTE" >&2
echo "run_dir=$RUN_DIR"
echo "groups=$GROUPS_JOB"
echo "lighthouse=$LIGHTHOUSE_JOB"
echo "cleanup=$CLEANUP_JOB"
