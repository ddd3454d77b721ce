"""`launch/mpi.sh`: two ranks under mpirun train the losses of the torchrun run, step for step.

MPICH comes from PyPI (the `mpich` wheel, in the dev and mpi extras). Debian's Open MPI
(`apt-get install openmpi-bin`) is used when installed, else that test is skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distrib.launchers.mpi import rank0_address
from tests.launch.conftest import assert_same_run, launch_env, run_args
from tests.support.runs import ROOT, records

VENV_MPIRUN = Path(sys.executable).parent / "mpirun"


def _version(mpirun: str) -> str:
    try:
        done = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return ""
    return done.stdout + done.stderr


def _open_mpi() -> str | None:
    """An Open MPI mpirun, if one is installed (Debian names it mpirun.openmpi too)."""
    for name in ("mpirun.openmpi", "/usr/bin/mpirun", "mpirun"):
        path = shutil.which(name)
        if path and "Open MPI" in _version(path):
            return path
    return None


def _mpi_run(mpirun: str, data_dir: Path, run_dir: Path, **env: str) -> list[dict]:
    done = subprocess.run(
        ["bash", "launch/mpi.sh", *run_args(data_dir, run_dir)],
        cwd=ROOT,
        env=launch_env(NP="2", MPIRUN=mpirun, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    return records(run_dir)


@pytest.mark.slow
def test_mpich_matches_torchrun(data_dir: Path, tmp_path: Path, torchrun_reference) -> None:
    assert "HYDRA" in _version(str(VENV_MPIRUN)), f"no MPICH mpirun at {VENV_MPIRUN}"
    got = _mpi_run(str(VENV_MPIRUN), data_dir, tmp_path)
    assert_same_run(got, torchrun_reference, world_size=2)


@pytest.mark.slow
def test_open_mpi_matches_torchrun(data_dir: Path, tmp_path: Path, torchrun_reference) -> None:
    mpirun = _open_mpi()
    if mpirun is None:
        pytest.skip("Open MPI is not installed (apt-get install openmpi-bin)")
    got = _mpi_run(mpirun, data_dir, tmp_path)
    assert_same_run(got, torchrun_reference, world_size=2)


def test_rank0_address() -> None:
    """All ranks on one host: loopback. Several hosts: what rank 0's name resolves to, or, when
    that is a loopback address, this host's address on the route to another rank's host."""
    assert rank0_address(["a", "a", "a"]) == "127.0.0.1"
    assert rank0_address(["10.1.2.3", "10.1.2.4"]) == "10.1.2.3"
    # 'localhost' resolves to loopback; the only route to 127.0.0.2 is loopback too.
    assert rank0_address(["localhost", "127.0.0.2"]).startswith("127.")


def test_mpirun_np_1_is_no_launch() -> None:
    """`mpirun -np 1` (PMI_RANK=0, PMI_SIZE=1 under MPICH's Hydra) is one process: no launch,
    and mpi4py (which would initialize MPI) is never imported."""
    if "HYDRA" not in _version(str(VENV_MPIRUN)):
        pytest.skip(f"no MPICH mpirun at {VENV_MPIRUN}")
    code = (
        "import sys; from distrib.runtime import detect_launch; "
        "print(detect_launch().launcher, 'mpi4py' in sys.modules)"
    )
    done = subprocess.run(
        [str(VENV_MPIRUN), "-np", "1", sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["none", "False"]
