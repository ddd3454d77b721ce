"""How each launcher describes a process's place in the job.

`torchrun` (and `accelerate launch`) set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; `srun`
without torchrun sets SLURM_PROCID and friends; `mpirun` sets its own variables. Each module here
turns one of them into a `LaunchInfo`; `distrib.runtime.detect_launch` tries them in order.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchInfo:
    """Rank layout of this process as the launcher describes it, and where rank 0 listens
    (None where the launcher already exported MASTER_ADDR / MASTER_PORT, as torchrun does)."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "slurm", "mpi" or "none"
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def distributed(self) -> bool:
        return self.launcher != "none"


def int_env(env: object, key: str) -> int:
    """`env[key]` as an int, or an error naming the variable."""
    value = env[key]  # type: ignore[index]
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {key}={value!r} is not an integer") from None
