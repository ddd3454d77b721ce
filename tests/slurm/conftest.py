"""A real Slurm cluster for the tests: `scripts/slurm_cluster.sh` installs the Debian packages if
missing and starts munged, slurmctld and two slurmd daemons (nodes n1 and n2 on 127.0.0.1) in a
folder of their own; the session fixture stops them by PID afterwards.

Without root, or without Slurm and apt-get, the tests are skipped; with CI=true they fail instead.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
SBATCH = REPO / "slurm" / "train.sbatch"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
# Launcher variables of the process running the tests must not leak into the jobs.
LEAKY = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _unavailable(reason: str) -> None:
    """Skip, or fail under CI, where the Slurm tests must run."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"Slurm tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _free_port_block() -> int:
    """A port P with P, P+4 and P+5 free (slurmctld and the two slurmd daemons), below the
    ephemeral range so no outgoing connection takes one meanwhile."""
    for _ in range(100):
        base = random.randrange(7000, 9990)
        try:
            for port in (base, base + 4, base + 5):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports for the Slurm daemons")


@dataclass
class Cluster:
    """A running cluster: its slurm.conf and small helpers around the Slurm commands."""

    conf: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for Slurm commands and the jobs they start (sbatch passes it on)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM") and k not in LEAKY}
        bin_dir = str(Path(sys.executable).parent)
        env.update(
            SLURM_CONF=str(self.conf),
            PYTHON=sys.executable,
            PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}",
            OMP_NUM_THREADS="1",
            # A worker that aborts (e.g. at interpreter exit) dumps every thread's stack.
            PYTHONFAULTHANDLER="1",
            **extra,
        )
        return env

    def run(self, *cmd: str, timeout: float = 60, **kw: object) -> str:
        """Run a Slurm command; its stdout."""
        out = subprocess.run(
            cmd, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False, **kw
        )
        assert out.returncode == 0, f"{' '.join(cmd)}: exit {out.returncode}\n{out.stderr}"
        return out.stdout

    def sbatch(self, args: list[str], cwd: Path, **env: str) -> int:
        """Submit a batch job; its id."""
        out = subprocess.run(
            ["sbatch", "--parsable", *args],
            env=self.env(**env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, f"sbatch failed: {out.stderr}"
        return int(out.stdout.strip().split(";")[0])

    def daemon_log(self, job_id: int) -> str:
        """What the daemons logged about a job, for failure messages."""
        lines = []
        for log in sorted(self.conf.parent.glob("*.log")):
            hits = [ln for ln in log.read_text().splitlines() if str(job_id) in ln]
            lines += [f"{log.name}: {ln}" for ln in hits[-40:]]
        return "\n".join(lines)

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, NodeList, ...); an array task is
        `ARRAYJOBID_TASKID`."""
        line = self.run("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id: int | str, timeout: float = 240) -> dict[str, str]:
        """Poll until the job has ended (`sbatch --wait` polls far more slowly)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in DONE:
                return info
            if time.monotonic() > deadline:
                self.run("scancel", str(job_id))
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout} s")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    """A two-node cluster of this session's own (state folder, ports, job ids)."""
    if os.geteuid() != 0:
        _unavailable("the local Slurm cluster needs root (scripts/slurm_cluster.sh)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        _unavailable("Slurm is not installed and there is no apt-get to install it")
    installed = subprocess.run(
        ["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=900
    )
    if installed.returncode != 0:
        _unavailable(f"could not install Slurm: {installed.stderr[-2000:]}")
    # /tmp itself: munged, running as its own user, must reach the socket folder.
    state = Path(tempfile.mkdtemp(prefix="distrib-slurm-", dir="/tmp"))
    env = {
        **os.environ,
        "SLURM_CLUSTER_DIR": str(state),
        "SLURM_CLUSTER_PORT": str(_free_port_block()),
        # Rendezvous ports derive from job ids: distinct ids keep concurrent sessions apart.
        "SLURM_FIRST_JOB_ID": str(random.randrange(1000, 900_000)),
    }
    try:
        started = subprocess.run(
            ["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=120
        )
        if started.returncode != 0:
            logs = "\n".join(
                f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted(state.glob("*.log"))
            )
            pytest.fail(f"the Slurm cluster did not start: {started.stderr}\n{logs}")
        yield Cluster(conf=state / "slurm.conf")
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, timeout=60, check=False)
        shutil.rmtree(state, ignore_errors=True)
