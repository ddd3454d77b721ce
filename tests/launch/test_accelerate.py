"""`accelerate launch -m distrib.cli train`: accelerate runs torchrun underneath and exports its
variables, so two processes train the torchrun run's losses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.conftest import assert_same_run, launch_env, run_args
from tests.support.runs import ROOT, records

pytestmark = pytest.mark.slow


def test_accelerate_launch_two_processes(
    data_dir: Path, tmp_path: Path, torchrun_reference
) -> None:
    # On a machine without GPUs, --multi_gpu is what makes accelerate start several processes
    # (through torchrun); --cpu alone starts one. The other flags only silence its warnings.
    cmd = [
        *(sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"),
        *("--multi_gpu", "--num_processes", "2", "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no"),
        *("-m", "distrib.cli", "train", "--config", "configs/debug.toml"),
        *run_args(data_dir, tmp_path),
    ]
    # HF_HOME: a user's `accelerate config` file must not change the launch.
    env = launch_env(HF_HOME=str(tmp_path / "hf_home"))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    assert_same_run(records(tmp_path), torchrun_reference, world_size=2)
