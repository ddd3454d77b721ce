"""Running the real `distrib train` command line, in one process or under torchrun, and reading
what a run logs: the one reader of `<run_dir>/metrics.jsonl` for every test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[2]


# Eight steps of 8 sequences with an evaluation and a checkpoint at step 4, recording every
# rank's sample ids: a run to stop at step 4 and resume, for the data-order tests.
RESUMABLE_RUN = [
    "--training.global_batch_size=8",
    "--training.micro_batch_size=2",
    "--training.steps=8",
    "--training.warmup_steps=2",
    "--training.eval_every=4",
    "--training.eval_steps=1",
    "--metrics.log_every=1",
    "--metrics.progress=false",
    "--checkpoint.interval=4",
    "--debug.record_samples=true",
]


def train_command(nproc: int, args: list[str], restarts: int = 0) -> list[str]:
    """`python -m distrib.cli train ARGS`, under `torchrun --standalone` when nproc > 1."""
    if nproc == 1:
        return [sys.executable, "-m", "distrib.cli", "train", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={restarts}",
        "-m",
        "distrib.cli",
        "train",
        *args,
    ]


def child_env() -> dict[str, str]:
    """One thread per process (the processes share 2 cores) and this checkout importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_train(nproc: int, args: list[str], code: int = 0, timeout: float = 600) -> str:
    """Run to the end; assert the exit code; return stdout + stderr."""
    done = subprocess.run(
        train_command(nproc, args),
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == code, done.stdout[-4000:] + done.stderr[-6000:]
    return done.stdout + done.stderr


def records(run_dir: Path) -> list[dict]:
    """Every record of `<run_dir>/metrics.jsonl`, in order: none before the file exists, and
    only whole lines, so a run that is still writing may be read at any time."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    *lines, _unfinished = path.read_text().split("\n")
    return [json.loads(line) for line in lines if line.strip()]


def sample_records(run_dir: Path) -> dict[int, list[int]]:
    """step -> the sample ids trained on (debug.record_samples), every rank's in rank order, so
    a step's list is its whole global batch in order whatever the layout."""
    per_step: dict[int, list[int]] = {}
    for path in sorted((run_dir / "samples").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            per_step.setdefault(rec["step"], []).extend(rec["samples"])
    return per_step


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll metrics.jsonl until `proc` (still running) has logged `step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if any(r["step"] >= step for r in records(run_dir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")
