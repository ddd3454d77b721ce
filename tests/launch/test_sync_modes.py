"""`training.sync` between fault-tolerant replica groups, every group on this node through
`launch/train.sh`: every-step sync and local SGD with H = 1 equal every-step data parallelism;
DiLoCo with H = 8 (waiting, and overlapped) all-reduces an eighth of the bytes and still learns."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.conftest import free_port, launch_env, run_args
from tests.support.runs import ROOT, records

pytestmark = pytest.mark.slow
pytest.importorskip("torchft")

# SGD with momentum: its update is linear in the gradient, so averaging parameters after each
# step (local SGD, H = 1) is averaging gradients; no clipping, which would act per group.
SGD = [
    "--training.optimizer=sgd",
    "--training.momentum=0.9",
    "--training.lr=0.05",
    "--training.min_lr=0.005",
    "--training.max_grad_norm=0",
    "--training.weight_decay=0",
]
# Both groups must be in every quorum from the first step, as data parallelism's ranks are.
GROUPS = ["--parallel.fault_tolerance=true", "--parallel.dp_replicate=2"]
GROUPS += ["--parallel.min_replica_groups=2"]


def _train(data_dir: Path, run_dir: Path, *overrides: str) -> None:
    # This interpreter's torch (the torch 2.11 subset runs this test too).
    env = launch_env(NGPU="2", LIGHTHOUSE_PORT=str(free_port()), PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", "launch/train.sh", *run_args(data_dir, run_dir, *overrides)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def _group_losses(run_dir: Path) -> list[float]:
    """Per step, the mean of the two groups' losses (each logs its own half of the batch)."""
    per_group = [records(run_dir / f"group{g}") for g in (0, 1)]
    assert [r["step"] for r in per_group[0]] == [r["step"] for r in per_group[1]]
    return [(a["loss"] + b["loss"]) / 2 for a, b in zip(*per_group, strict=True)]


def test_every_step_and_local_sgd_h1_equal_data_parallelism(data_dir: Path, tmp_path: Path) -> None:
    _train(data_dir, tmp_path / "ddp", *SGD, "--parallel.dp_replicate=2")
    want = [r["loss"] for r in records(tmp_path / "ddp")]
    for name, sync in [("every", "every_step"), ("local", "local_sgd")]:
        run = tmp_path / name
        _train(data_dir, run, *SGD, *GROUPS, f"--training.sync={sync}", "--training.sync_every=1")
        got = _group_losses(run)
        assert len(got) == len(want) == 8
        for step, (g, w) in enumerate(zip(got, want, strict=True), start=1):
            assert math.isclose(g, w, rel_tol=1e-6), (sync, step, g, w)


def test_diloco_exchanges_an_eighth_and_learns(data_dir: Path, tmp_path: Path) -> None:
    steps = ["--training.steps=24", "--training.warmup_steps=2"]
    _train(data_dir, tmp_path / "every", *GROUPS, *steps)
    every = records(tmp_path / "every" / "group0")
    per_step = every[-1]["sync_bytes"] / 24
    assert per_step > 0 and every[0]["sync_bytes"] == per_step  # one gradient exchange a step
    diloco = [*GROUPS, *steps, "--training.sync=diloco", "--training.sync_every=8"]
    diloco += ["--checkpoint.interval=8"]
    for name, extra in [("diloco", []), ("overlapped", ["--training.sync_delay=4"])]:
        run = tmp_path / name
        _train(data_dir, run, *diloco, *extra)
        for g in (0, 1):
            recs = records(run / f"group{g}")
            # Three synchronizations of every parameter in 24 steps: 1/8 of every-step sync.
            assert recs[-1]["sync_bytes"] == per_step * 24 / 8, name
            assert recs[2]["sync_bytes"] == 0  # nothing before the first (possibly early) send
            assert recs[-1]["loss"] < recs[0]["loss"] - 0.05, (
                name,
                recs[0]["loss"],
                recs[-1]["loss"],
            )

    # Stopped at the round's end (step 8, a checkpoint with the outer momentum) and started
    # again, the groups go on as the unbroken run did: steps 17-24 follow the second outer step,
    # which used the momentum of the first.
    _train(data_dir, tmp_path / "resumed", *diloco, "--training.stop_at_step=8")
    _train(data_dir, tmp_path / "resumed", *diloco)
    want = _group_losses(tmp_path / "diloco")[8:]
    got = _group_losses(tmp_path / "resumed")[8:]
    assert len(got) == 16
    for step, (g, w) in enumerate(zip(got, want, strict=True), start=9):
        assert math.isclose(g, w, rel_tol=1e-6), (step, g, w)
