"""Metrics that need several ranks: straggler reports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.test_parity import RUN

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


def test_a_sleeping_rank_is_reported(data_dir: Path, tmp_path: Path) -> None:
    """Rank 1 sleeps 0.4 s per step; the others wait for it, and it is named with its host."""
    args = [
        f"--data.dir={data_dir}",
        f"--job.run_dir={tmp_path}",
        *RUN,
        "--parallel.dp_shard=2",
        "--training.steps=6",
        "--metrics.straggler_every=3",
        "--debug.straggler_rank=1",
        "--debug.straggler_sleep_s=0.4",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "distrib.cli",
        "train",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    checks = [r for r in records if "stragglers" in r]
    assert [r["step"] for r in checks] == [3, 6]
    for r in checks:
        assert [s["rank"] for s in r["stragglers"]] == [1]
        assert r["stragglers"][0]["host"] == socket.gethostname()
        assert r["stragglers"][0]["lag_s"] == pytest.approx(0.4, abs=0.15)
    assert "straggler: rank 1 on" in done.stdout + done.stderr
