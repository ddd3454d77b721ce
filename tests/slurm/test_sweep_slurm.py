"""`distrib sweep` with `launcher = "slurm"` on the local two-node cluster (conftest.py): the
workers run as a job array that shares the study's journal file, each trial under torchrun with
two processes inside its array task, and the sweep completes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from optuna.trial import TrialState

from distrib.commands.sweep_study import trial_dir
from tests.slurm.conftest import Cluster
from tests.support.sweeps import sweep_command, tiny_sweep_flags, trials, write_space

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_a_sweep_runs_as_a_slurm_job_array(
    slurm_cluster: Cluster, data_dir: Path, tmp_path: Path
) -> None:
    space = write_space(
        tmp_path / "space.toml",
        {"trials": 3, "workers": 2, "nproc": 2, "sampler": "tpe", "launcher": "slurm"},
        {"training.steps": 6, "training.eval_every": 3, "parallel.dp_shard": 2},
    )
    done = subprocess.run(
        sweep_command("--space", space, "--dir", "sw", *tiny_sweep_flags(data_dir)),
        cwd=tmp_path,
        env=slurm_cluster.env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    sweep_dir = tmp_path / "sw"
    logs = "\n".join(p.read_text() for p in sorted((sweep_dir / "slurm").glob("*.out")))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs[-4000:]
    assert "submitted worker array" in done.stdout
    found = trials(sweep_dir)
    assert [t.state for t in found] == [TrialState.COMPLETE] * 3
    job = done.stdout.split("submitted worker array ")[1].split()[0]
    workers = {
        json.loads((trial_dir(sweep_dir, t.number) / "heartbeat.json").read_text())["slurm_job"]
        for t in found
    }
    assert workers <= {f"{job}_0", f"{job}_1"} and workers, workers
    assert len(list((sweep_dir / "slurm").glob(f"worker-{job}_*.out"))) == 2
    assert (sweep_dir / "best.toml").is_file()
