"""Who this process is (rank, world, local rank), which device and backend it uses, and the
process group's life cycle.

Launchers are read through one seam, `detect_launch()`: torchrun today; Slurm (`SLURM_PROCID`...)
and MPI (`OMPI_COMM_WORLD_RANK`, `PMI_RANK`...) plug in there without touching callers.
"""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchInfo:
    """Rank layout of this process as the launcher describes it."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" or "none"; Slurm and MPI join here

    @property
    def distributed(self) -> bool:
        return self.launcher != "none"


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise RuntimeError(f"environment variable {key}={env[key]!r} is not an integer") from None


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read the launcher's environment; no launcher means one process and no process group."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        # torchrun (and accelerate, which sets the same variables).
        return LaunchInfo(
            rank=_int_env(env, "RANK"),
            world_size=_int_env(env, "WORLD_SIZE"),
            local_rank=_int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            launcher="torchrun",
        )
    return LaunchInfo(rank=0, world_size=1, local_rank=0, launcher="none")


def pick_device(local_rank: int) -> torch.device:
    """`cuda:LOCAL_RANK` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class Runtime:
    """This process's place in the job, and its device."""

    launch: LaunchInfo
    device: torch.device

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def is_main(self) -> bool:
        return self.launch.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def init_runtime(timeout_s: float = 1800.0) -> Runtime:
    """Detect the launch, pick the device and, when launched as several processes, start the
    process group (nccl on GPUs, gloo on CPUs). One process needs no process group."""
    launch = detect_launch()
    device = pick_device(launch.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launch.distributed and not dist.is_initialized():
        dist.init_process_group(
            backend=backend_for(device),
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return Runtime(launch=launch, device=device)


def shutdown() -> None:
    """Tear down the process group if one was started; safe to call more than once."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, object]:
    """This process's random generator states, to store in a checkpoint."""
    state: dict[str, object] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, object]) -> None:
    """Restore what `rng_state()` captured."""
    random.setstate(state["python"])  # type: ignore[arg-type]
    np.random.set_state(state["numpy"])  # type: ignore[arg-type]
    torch.set_rng_state(state["torch"])  # type: ignore[arg-type]
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])  # type: ignore[arg-type]
