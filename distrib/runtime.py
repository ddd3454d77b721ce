"""Who this process is (rank, world, local rank), which device and backend it uses, and the
process group's life cycle.

Launchers are read through one seam, `detect_launch()`: torchrun, `srun` tasks and mpirun
(`distrib.launchers`).
"""

from __future__ import annotations

import datetime
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distrib.errors import ConfigError
from distrib.launchers import LaunchInfo, int_env, mpi, slurm


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read the launcher's environment: torchrun (or accelerate), then an `srun` task, then
    mpirun; none of them means one process and no process group."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        # torchrun and accelerate export these, also when they run inside srun or mpirun.
        return LaunchInfo(
            rank=int_env(env, "RANK"),
            world_size=int_env(env, "WORLD_SIZE"),
            local_rank=int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            launcher="torchrun",
        )
    for detect in (slurm.detect, mpi.detect):
        found = detect(env)
        if found is not None:
            return found
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


def _restart_safe_store(env: Mapping[str, str], timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the agent's store with a prefix per restart attempt.

    The agent keeps one store across restarts of the worker group, and gloo's full-mesh
    connect reads peer addresses from it: without a fresh prefix a restarted rank can find the
    dead group's addresses and hang in init_process_group (seen with torch 2.13 on CPU).
    """
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"distrib/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_runtime(timeout_s: float = 1800.0, launch: LaunchInfo | None = None) -> Runtime:
    """Detect the launch (unless given), pick the device and, when launched as several
    processes, start the process group (nccl on GPUs, gloo on CPUs). One process needs no
    process group."""
    launch = detect_launch() if launch is None else launch
    device = pick_device(launch.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launch.distributed and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _restart_safe_store(os.environ, timeout)
        if store is not None:
            init = {"store": store}
        elif launch.master_addr is not None:
            init = {"init_method": f"tcp://{launch.master_addr}:{launch.master_port}"}
        else:
            init = {"init_method": "env://"}
        dist.init_process_group(
            backend=backend_for(device),
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
            **init,  # type: ignore[arg-type]
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


def import_deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed with the accelerator matching `device`: on a machine without GPUs its
    CPU accelerator, whose communication backend is gloo (ccl only with oneCCL installed)."""
    if device.type == "cpu":
        # Before the first import: DeepSpeed picks its accelerator once, and otherwise warns
        # that it fell back to the CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as err:
        raise ConfigError(
            "parallel.engine = 'deepspeed' needs DeepSpeed: pip install 'distrib[deepspeed]'"
        ) from err
    # DeepSpeed logs its whole configuration and every phase at INFO; distrib prints the
    # effective config itself, so keep DeepSpeed to warnings.
    deepspeed.utils.logging.logger.setLevel(logging.WARNING)
    name = get_accelerator().device_name()
    if name != device.type:
        raise ConfigError(
            f"DeepSpeed's accelerator is '{name}' but this process runs on {device}: "
            f"unset DS_ACCELERATOR (it is '{os.environ.get('DS_ACCELERATOR', '')}')"
        )
    return deepspeed
