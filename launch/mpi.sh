#!/usr/bin/env bash
# Train under mpirun (MPICH, as the `mpi` extra installs it, or Open MPI): one process per rank;
# each reads its rank from the MPI environment and rank 0's address arrives over MPI (mpi4py).
#
#   [NP=8] [HOSTS=node1:4,node2:4 | HOSTFILE=hosts] [CONFIG=configs/llama3_8b.toml] \
#   launch/mpi.sh [--section.key=value ...]
#
# Environment (all optional):
#   NP                  ranks in all (default: the GPUs nvidia-smi lists, 2 without any)
#   HOSTS               host:slots,... to spread the ranks over (default: this machine)
#   HOSTFILE            a host file instead (MPICH: host:slots per line; Open MPI: host slots=N)
#   CONFIG              TOML config (default configs/debug.toml)
#   MPIRUN              the mpirun to use (default: .venv/bin/mpirun, the mpich wheel's, when
#                       present, else mpirun on PATH); MPICH and Open MPI are told apart by
#                       `mpirun --version`
#   MPI_ARGS            extra mpirun flags, split on spaces
#   MASTER_ADDR/PORT    skip the MPI broadcast: rank 0 listens here (exported to every rank)
#   OMP_NUM_THREADS     threads per rank (default 1 with several ranks per machine, as torchrun)
#   PYTHON              interpreter (default .venv/bin/python when present, else python3)
# Arguments are config overrides. Paths are relative to the repository root, as in quickstart.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$VENV/bin/python" ]; then PYTHON=$VENV/bin/python; else PYTHON=python3; fi
fi
if [ -z "${MPIRUN:-}" ]; then
  if [ -x "$VENV/bin/mpirun" ]; then MPIRUN=$VENV/bin/mpirun; else MPIRUN=mpirun; fi
fi
CONFIG=${CONFIG:-configs/debug.toml}
if [ -z "${NP:-}" ]; then
  NP=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    NP=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
  fi
  [ "$NP" -gt 0 ] || NP=2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if ! VERSION=$("$MPIRUN" --version 2>&1); then
  echo "launch/mpi.sh: cannot run '$MPIRUN --version'; install the mpi extra (pip install" \
    "-e '.[mpi]') or an MPI (apt-get install openmpi-bin), or set MPIRUN" >&2
  exit 2
fi

ARGS=(-np "$NP")
case "$VERSION" in
  *"Open MPI"* | *"Open RTE"* | *OpenRTE*)
    # Open MPI binds each rank to one core by default, which starves a rank's data-loading and
    # intra-op threads; torchrun does not bind either.
    ARGS+=(--bind-to none)
    # Open MPI refuses root unless told; containers commonly run as root.
    if [ "$(id -u)" -eq 0 ]; then
      export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
    # mpi4py's wheel picks the first MPI library it finds, the mpich wheel's when it sits in the
    # same venv: name Open MPI's.
    export MPI4PY_LIBMPI=${MPI4PY_LIBMPI:-libmpi.so.40}
    [ -z "${HOSTS:-}" ] || ARGS+=(--host "$HOSTS")
    [ -z "${HOSTFILE:-}" ] || ARGS+=(--hostfile "$HOSTFILE")
    # Open MPI forwards only named variables to other machines; MPICH forwards everything.
    for var in MASTER_ADDR MASTER_PORT OMP_NUM_THREADS MPI4PY_LIBMPI PYTHONPATH; do
      [ -z "${!var:-}" ] || ARGS+=(-x "$var")
    done
    ;;
  *)
    # MPICH / Intel MPI (Hydra).
    [ -z "${HOSTS:-}" ] || ARGS+=(-hosts "$HOSTS")
    [ -z "${HOSTFILE:-}" ] || ARGS+=(-f "$HOSTFILE")
    ;;
esac

# shellcheck disable=SC2086  # MPI_ARGS is a list of flags on purpose
exec "$MPIRUN" "${ARGS[@]}" ${MPI_ARGS:-} \
  "$PYTHON" -m distrib.cli train --config "$CONFIG" "$@"
