"""Helpers for the CLI tests: a short run of the tiny model, in this process."""

from __future__ import annotations

from pathlib import Path

from distrib.cli import main
from tests.support.tiny import tiny_flags

# The tiny model for 8 steps: a few steps per second.
TINY_RUN = [
    *tiny_flags(),
    "--data.seq_len=64",
    "--training.global_batch_size=8",
    "--training.micro_batch_size=4",
    "--training.steps=8",
    "--training.warmup_steps=2",
    "--training.eval_every=4",
    "--training.eval_steps=2",
    "--metrics.log_every=1",
    "--metrics.progress=false",
    "--checkpoint.interval=4",
]


def train(data_dir: Path, run_dir: Path, *overrides: str) -> int:
    return main(
        ["train", f"--data.dir={data_dir}", f"--job.run_dir={run_dir}", *TINY_RUN, *overrides]
    )
