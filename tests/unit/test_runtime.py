"""Who this process is, from the launcher's environment, and reproducible RNG state."""

import random

import numpy as np
import pytest
import torch

from distrib.launchers.slurm import job_port
from distrib.runtime import (
    backend_for,
    detect_launch,
    init_runtime,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
    shutdown,
)


def test_no_launcher_is_one_process() -> None:
    info = detect_launch({})
    assert (info.rank, info.world_size, info.local_rank, info.distributed) == (0, 1, 0, False)


def test_torchrun_environment() -> None:
    info = detect_launch({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (3, 4, 1, "torchrun")
    assert info.distributed


def test_bad_environment_names_the_variable() -> None:
    with pytest.raises(RuntimeError, match="WORLD_SIZE='two'"):
        detect_launch({"RANK": "0", "WORLD_SIZE": "two"})


def test_device_and_backend_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = pick_device(local_rank=1)
    assert device == torch.device("cpu") and backend_for(device) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"


def test_init_runtime_single_process_starts_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    runtime = init_runtime()
    assert runtime.is_main and runtime.world_size == 1
    assert not torch.distributed.is_initialized()
    runtime.barrier()  # a no-op without a process group
    shutdown()


def test_rng_state_round_trip() -> None:
    seed_everything(7)
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_srun_task_without_torchrun() -> None:
    env = {
        "SLURM_PROCID": "3",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "12345",
        "MASTER_ADDR": "10.0.0.7",
    }
    info = detect_launch(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (3, 4, 1, "slurm")
    # The port is derived from the job id so that two jobs on one node never collide.
    assert (info.master_addr, info.master_port) == ("10.0.0.7", job_port(12345))
    assert job_port(12345) != job_port(12346)


def test_torchrun_inside_srun_wins() -> None:
    env = {
        "SLURM_PROCID": "0",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "2",
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
    }
    assert detect_launch(env).launcher == "torchrun"


def test_slurm_batch_script_is_one_process() -> None:
    # The batch script itself has SLURM_PROCID=0 but is not a step's task.
    assert (
        detect_launch({"SLURM_PROCID": "0", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}).launcher
        == "none"
    )


@pytest.mark.parametrize(
    "env",
    [
        {
            "OMPI_COMM_WORLD_RANK": "1",
            "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        },
        {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"},
    ],
)
def test_mpirun_environments(env: dict[str, str]) -> None:
    info = detect_launch({**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"})
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (1, 2, 1, "mpi")
    assert (info.master_addr, info.master_port) == ("127.0.0.1", 29555)


@pytest.fixture
def no_mpi4py(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the launch detection goes into mpi4py (which initializes MPI)."""
    from distrib.launchers import mpi

    def refuse(why: str) -> None:
        raise AssertionError(f"went into mpi4py ({why})")

    monkeypatch.setattr(mpi, "_mpi", refuse)


@pytest.mark.parametrize(
    "stray",
    [
        {"PMI_RANK": "0", "PMI_SIZE": "1"},
        {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"},
        {"PMIX_RANK": "0", "PMIX_SIZE": "1", "PMI_RANK": "0", "PMI_SIZE": "1"},
    ],
    ids=["pmi", "ompi", "pmix+pmi"],
)
def test_stray_mpi_variables_of_a_world_of_one_are_no_launch(
    monkeypatch: pytest.MonkeyPatch, no_mpi4py: None, stray: dict[str, str]
) -> None:
    """A container image that exports PMI_* / OMPI_* for a lone process: one process, no MPI,
    no process group (as for a one-task srun step)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in stray.items():
        monkeypatch.setenv(key, value)
    info = detect_launch()
    assert (info.rank, info.world_size, info.launcher, info.distributed) == (0, 1, "none", False)
    runtime = init_runtime()
    assert runtime.world_size == 1 and not torch.distributed.is_initialized()
    shutdown()


def test_stray_world_of_one_does_not_hide_a_real_mpirun(no_mpi4py: None) -> None:
    env = {
        "PMI_RANK": "0",
        "PMI_SIZE": "1",  # stray, from the image
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29555",
    }
    info = detect_launch(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (1, 2, 1, "mpi")
