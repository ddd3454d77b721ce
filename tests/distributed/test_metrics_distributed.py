"""Metrics that need several ranks: straggler reports."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.distributed.test_parity import RUN
from tests.support.runs import records, run_train

pytestmark = pytest.mark.slow


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
    out = run_train(2, args)
    checks = [r for r in records(tmp_path) if "stragglers" in r]
    assert [r["step"] for r in checks] == [3, 6]
    for r in checks:
        assert [s["rank"] for s in r["stragglers"]] == [1]
        assert r["stragglers"][0]["host"] == socket.gethostname()
        assert r["stragglers"][0]["lag_s"] == pytest.approx(0.4, abs=0.15)
    assert "straggler: rank 1 on" in out
