#!/usr/bin/env bash
# A real two-node Slurm cluster on loopback, for the tests and for trying slurm/train.sbatch.
#
#   bash scripts/slurm_cluster.sh install  # apt-get the Debian 12 packages if missing (root)
#   bash scripts/slurm_cluster.sh start    # install if missing, start, wait until both nodes idle
#   bash scripts/slurm_cluster.sh status   # sinfo; exit 1 when the cluster is not up
#   bash scripts/slurm_cluster.sh stop     # stop the daemons this script started, by PID
#   bash scripts/slurm_cluster.sh env      # print `export SLURM_CONF=...` for eval
#
# Everything lives in one state folder, so several clusters can run side by side:
#   SLURM_CLUSTER_DIR   state folder (default /tmp/distrib-slurm): slurm.conf, logs, spools, pids
#   SLURM_CLUSTER_PORT  slurmctld's port (default 6817); the slurmd daemons use PORT+4 and PORT+5
#   SLURM_FIRST_JOB_ID  first job id of a new cluster (default 1)
#   SLURM_NODE_CPUS     CPUs Slurm believes each node has (default 4)
# The nodes n1 and n2 are two slurmd daemons on this host (NodeAddr 127.0.0.1); their names do
# not resolve, as on clusters whose node names are not DNS names.
set -euo pipefail

DIR=${SLURM_CLUSTER_DIR:-/tmp/distrib-slurm}
PORT=${SLURM_CLUSTER_PORT:-6817}
FIRST_JOB_ID=${SLURM_FIRST_JOB_ID:-1}
CPUS=${SLURM_NODE_CPUS:-4}
NODES=(n1 n2)
CONF=$DIR/slurm.conf
MUNGE_DIR=$DIR/munge
export SLURM_CONF=$CONF

die() {
    echo "slurm_cluster.sh: $*" >&2
    exit 1
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "needs root to install ${missing[*]}"
    command -v apt-get >/dev/null || die "no apt-get to install ${missing[*]}"
    echo "installing ${missing[*]}" >&2
    # Without an init system the packages' services stay down; this script starts the daemons.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; } ||
        die "could not install the Slurm packages"
}

write_conf() {
    mkdir -p "$DIR/ctld"
    # munged (as the munge user) must reach its socket folder through every parent.
    chmod 755 "$DIR"
    local n=0 node
    {
        cat <<EOF
ClusterName=distrib
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also holds a requeued job back (default 120 s); short, so the tests' requeued jobs
# restart by themselves within seconds.
AuthInfo=socket=$MUNGE_DIR/munge.socket.2,cred_expire=15
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The nodes claim more CPUs than this host has; without this they would be marked invalid.
SlurmdParameters=config_overrides
# Schedule at once, and look again every few seconds (a requeued job becomes eligible later).
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=1
# Running jobs may be requeued (slurm/train.sbatch requeues itself after a stop signal).
JobRequeue=1
ReturnToService=2
FirstJobId=$FIRST_JOB_ID
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=30
MinJobAge=600
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
EOF
        for node in "${NODES[@]}"; do
            n=$((n + 1))
            echo "NodeName=$node NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + 3 + n))" \
                "CPUs=$CPUS RealMemory=4000 State=UNKNOWN"
        done
        # Jobs in `urgent` preempt jobs in `debug` (after its GraceTime), as on shared clusters.
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES PriorityTier=1" \
            "GraceTime=60 MaxTime=INFINITE State=UP"
        echo "PartitionName=urgent Nodes=$(IFS=,; echo "${NODES[*]}") PriorityTier=10" \
            "MaxTime=INFINITE State=UP"
    } >"$CONF"
}

alive() { # pid file
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munge() {
    alive "$MUNGE_DIR/munged.pid" && return 0
    mkdir -p "$MUNGE_DIR"
    chown munge:munge "$MUNGE_DIR"
    chmod 755 "$MUNGE_DIR" # clients need to reach the socket
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
    fi
    runuser -u munge -- munged --socket="$MUNGE_DIR/munge.socket.2" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed"
}

wait_idle() {
    for _ in $(seq 1 150); do
        # One line per node and partition; count the nodes.
        if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | grep -c ' idle$')" -eq ${#NODES[@]} ]; then
            return 0
        fi
        sleep 0.2
    done
    sinfo -N >&2 || true
    die "the nodes did not become idle in 30 s; logs in $DIR"
}

start() {
    [ "$(id -u)" -eq 0 ] || die "needs root (the daemons run as root)"
    install_packages
    mkdir -p "$DIR"
    # A fresh slurm.conf unless a controller already runs on it (job ids carry on in ctld/).
    alive "$DIR/slurmctld.pid" || write_conf
    start_munge
    alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
    local node
    for node in "${NODES[@]}"; do
        alive "$DIR/slurmd-$node.pid" || slurmd -f "$CONF" -N "$node"
    done
    wait_idle
    echo "Slurm cluster up: export SLURM_CONF=$CONF" >&2
}

stop() {
    # All at once, then wait: each daemon takes a moment to shut down.
    local pids=() f pid left
    for f in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$MUNGE_DIR/munged.pid"; do
        if alive "$f"; then pids+=("$(cat "$f")"); fi
    done
    [ ${#pids[@]} -eq 0 ] && return 0
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 50); do
        left=0
        for pid in "${pids[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then left=1; fi
        done
        [ $left -eq 0 ] && return 0
        sleep 0.1
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

status() {
    alive "$DIR/slurmctld.pid" || die "slurmctld is not running (state folder $DIR)"
    sinfo -N
}

case ${1:-} in
install) install_packages ;;
start) start ;;
stop) stop ;;
status) status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*) die "usage: $0 install|start|stop|status|env" ;;
esac
