"""Helpers for the launcher tests: a tiny run on top of configs/debug.toml, a clean environment,
and real launcher processes started in their own session so a failed test leaves none behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.runs import ROOT, records
from tests.support.tiny import tiny_flags

# The debug config with the tiny model, 8 steps in about a second per process.
TINY_RUN = [
    *tiny_flags(),
    "--data.seq_len=64",
    "--training.global_batch_size=8",
    "--training.micro_batch_size=4",
    "--training.steps=8",
    "--training.warmup_steps=2",
    "--training.eval_every=0",
    "--metrics.log_every=1",
    "--metrics.progress=false",
    "--metrics.tensorboard=false",
    "--checkpoint.interval=0",
]

# Variables by which a launcher around the test run (torchrun, Slurm, mpirun) would describe
# *its* processes; the launchers under test must not inherit them.
_LAUNCHER_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "MV2_", "HYDRA_", "TORCHELASTIC_")
_LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"}
_LAUNCHER_VARS |= {"MASTER_ADDR", "MASTER_PORT", "NGPU", "NNODES", "NODE_RANK", "NP"}
_LAUNCHER_VARS |= {"RDZV_ENDPOINT", "CONFIG", "MAX_RESTARTS", "LOG_DIR", "MPIRUN"}
_LAUNCHER_VARS |= {
    "TORCHFT_LIGHTHOUSE",
    "REPLICA_GROUP",
    "DISTRIB_REPLICA_GROUP",
    "LIGHTHOUSE_PORT",
}


def launch_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables, plus `extra`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _LAUNCHER_VARS and not key.startswith(_LAUNCHER_PREFIXES)
    }
    env["OMP_NUM_THREADS"] = "1"
    # These tests are about launchers: CPU processes (gloo) even on a machine with GPUs.
    env["CUDA_VISIBLE_DEVICES"] = ""
    return {**env, **extra}


def run_args(data_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [f"--data.dir={data_dir}", f"--job.run_dir={run_dir}", *TINY_RUN, *overrides]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Launched:
    """A launcher command running in its own session, its console output in a file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.proc.args} still running after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Kill what is left of this launch (its whole session), then close the log."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._out.close()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator:
    """`launch(name, cmd, **env)` starts a launcher; all are stopped after the test."""
    started: list[Launched] = []

    def start(name: str, cmd: list[str], **env: str) -> Launched:
        launched = Launched(cmd, launch_env(**env), tmp_path / f"{name}.log")
        started.append(launched)
        return launched

    yield start
    for launched in started:
        launched.stop()


def wait_for(predicate, timeout: float, what: str, every: float = 0.1) -> None:
    """Poll `predicate` until it holds, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="session")
def torchrun_reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The tiny run's records from `launch/train.sh` on one node with two processes, the
    reference the other launchers must reproduce."""
    run_dir = tmp_path_factory.mktemp("torchrun_ref")
    done = subprocess.run(
        ["bash", "launch/train.sh", *run_args(data_dir, run_dir)],
        cwd=ROOT,
        env=launch_env(NGPU="2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return records(run_dir)


def assert_same_run(got: list[dict], want: list[dict], world_size: int) -> None:
    """Step for step the same losses (to 1e-6), and the work split over `world_size` ranks."""
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 9))
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-6), g["step"]
        assert g["tokens"] == w["tokens"]
        assert g["tokens_per_s_per_device"] == pytest.approx(g["tokens_per_s"] / world_size)
