"""Sweeps of the tiny model for the CLI tests: a sweep file, the command line, the trials."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import optuna
import tomli_w

from distrib.commands.sweep_folder import load_setup
from distrib.commands.sweep_study import open_study
from tests.support.tiny import tiny_flags


def tiny_sweep_flags(data_dir: Path) -> list[str]:
    """Command-line overrides every trial gets: the tiny model on the test corpus."""
    return [
        *tiny_flags(),
        f"--data.dir={data_dir}",
        "--data.seq_len=64",
        "--training.global_batch_size=8",
        "--training.micro_batch_size=2",
        "--training.min_lr=0.0",
        "--training.warmup_steps=2",
        "--training.eval_steps=1",
        "--metrics.progress=false",
        "--metrics.tensorboard=false",
    ]


def write_space(
    path: Path,
    sweep: dict[str, Any],
    overrides: dict[str, Any],
    pruner: dict[str, Any] | None = None,
) -> Path:
    """A sweep file over the learning rate (log-uniform over a range wide enough that some
    trials learn and some do not) and the warmup."""
    params = {
        "training.lr": {"type": "log_uniform", "low": 1e-5, "high": 0.3},
        "training.warmup_steps": {"type": "int", "low": 0, "high": 4, "step": 2},
    }
    doc = {"sweep": sweep, "overrides": overrides, "pruner": pruner or {}, "params": params}
    path.write_text(tomli_w.dumps(doc))
    return path


def sweep_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "distrib.cli", "sweep", *(str(a) for a in args)]


def trials(sweep_dir: Path) -> list[optuna.trial.FrozenTrial]:
    """The sweep's trials, read from its study."""
    setup = load_setup(sweep_dir)
    return open_study(setup.space, setup.sweep_dir).get_trials()
