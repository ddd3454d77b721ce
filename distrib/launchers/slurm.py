"""Slurm: one task per GPU started by `srun` directly (no torchrun), and the rendezvous address
of an allocation for the torchrun-per-node path in `slurm/train.sbatch`.

`python -m distrib.launchers.slurm rendezvous` prints `ADDR:PORT` for the current job.

What Slurm sets (checked on Slurm 22.05, `scripts/slurm_cluster.sh`): every task of an `srun`
step has SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_ID, SLURM_STEP_NUM_TASKS and
SLURM_STEP_NODELIST; the batch script itself also has SLURM_PROCID=0 and SLURM_LOCALID=0 but no
SLURM_STEP_* variables, so it is not mistaken for a task. SLURM_NTASKS is the step's task count
inside a step but the job's in the batch script; SLURM_STEP_NUM_TASKS is always the step's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

from distrib.launchers import LaunchInfo, int_env

# Rendezvous ports are derived from the job id so that two jobs sharing a node do not collide
# (unless their ids are a multiple of PORT_SPAN apart); the range stays below Linux's ephemeral
# ports (32768 and up), which outgoing connections take.
PORT_BASE, PORT_SPAN = 15000, 15000


def job_port(job_id: int) -> int:
    """The rendezvous port of job `job_id`."""
    return PORT_BASE + job_id % PORT_SPAN


def in_srun_task(env: Mapping[str, str]) -> bool:
    """Whether this process is a task of an `srun` step (not the batch script itself, where
    SLURM_PROCID is 0 but no step has been launched)."""
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_STEP_NUM_TASKS" in env


def _scontrol(*args: str) -> str:
    try:
        return subprocess.run(
            ["scontrol", *args], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(f"scontrol {' '.join(args)} failed: {err}") from None


def first_host(nodelist: str) -> str:
    """The first node of a Slurm node list such as `gpu[01-04],cpu7`."""
    hosts = _scontrol("show", "hostnames", nodelist).split()
    if not hosts:
        raise RuntimeError(f"Slurm node list {nodelist!r} names no host")
    return hosts[0]


def node_address(node: str) -> str:
    """The address Slurm itself uses to reach `node` (its NodeAddr), which resolves even where
    node names are not DNS names; the name itself where Slurm will not tell (PrivateData)."""
    try:
        fields = _scontrol("show", "node", node, "-o").split()
    except RuntimeError:
        return node
    for field in fields:
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return node


def rendezvous(env: Mapping[str, str]) -> tuple[str, int]:
    """(address, port) of rank 0 for this job: MASTER_ADDR / MASTER_PORT when exported, else
    the first node of the step (or job) and a port derived from the job id."""
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise RuntimeError("neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
        addr = node_address(first_host(nodelist))
    if "MASTER_PORT" in env:
        port = int_env(env, "MASTER_PORT")
    else:
        port = job_port(int_env(env, "SLURM_JOB_ID"))
    return addr, port


def detect(env: Mapping[str, str]) -> LaunchInfo | None:
    """The layout of an `srun` task, or None outside one (and in a one-task step, which needs
    no process group)."""
    if not in_srun_task(env) or int_env(env, "SLURM_STEP_NUM_TASKS") == 1:
        return None
    addr, port = rendezvous(env)
    return LaunchInfo(
        rank=int_env(env, "SLURM_PROCID"),
        world_size=int_env(env, "SLURM_STEP_NUM_TASKS"),
        local_rank=int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
        launcher="slurm",
        master_addr=addr,
        master_port=port,
    )


def main(argv: list[str]) -> int:
    """`rendezvous`: print ADDR:PORT of this job's first node (for torchrun --rdzv-endpoint)."""
    if argv != ["rendezvous"]:
        print("usage: python -m distrib.launchers.slurm rendezvous", file=sys.stderr)
        return 2
    addr, port = rendezvous(os.environ)
    print(f"{addr}:{port}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
