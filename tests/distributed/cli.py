"""The real `distrib train` command line, in one process or under torchrun, for the tests that
compare layouts and runs: the model they share, the command, and reading metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[2]

# Debug-shaped but small: 4 layers so that pipelines get 2 stages of 2 or 4 stages of 1, heads
# divisible by tp=2, untied embeddings so that tp and pp may split them.
MODEL = [
    "--model.dim=64",
    "--model.n_layers=4",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--model.ffn_dim=128",
    "--model.vocab_size=512",
    "--model.max_seq_len=64",
    "--model.tie_embeddings=false",
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
    """Every record of `<run_dir>/metrics.jsonl`, in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll metrics.jsonl until `proc` (still running) has logged `step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r["step"] >= step for r in records(run_dir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")
