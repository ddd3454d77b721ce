"""Helpers for the CLI tests: a tiny model and run, and reading metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from distrib.cli import main

# A model small enough for a few steps per second.
TINY_MODEL = [
    "--model.dim=64",
    "--model.n_layers=2",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--model.ffn_dim=160",
    "--model.vocab_size=512",
    "--model.max_seq_len=128",
]
TINY_RUN = [
    *TINY_MODEL,
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


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
