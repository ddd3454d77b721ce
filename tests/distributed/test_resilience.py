"""Checkpoints that survive: resume into other layouts, SIGKILL with torchrun restarts, stop
signals on one rank, NaNs on one rank, background saves; real processes under torchrun.

Tolerances. A resume into the same layout is bitwise (float32 on CPU). A resume into another
layout restores the same numbers, but tensor and pipeline parallelism add float32 sums in other
orders, so the per-step losses of the resharded chain are compared to the one-process run at
rtol 1e-5 (the parity suite's loss tolerance; measured well below it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from distrib import checkpoint as ckpt
from distrib.checkpoint.run import load_run
from tests.support.runs import ROOT, child_env, records, run_train, train_command, wait_for_step
from tests.support.tiny import tiny_flags

pytestmark = pytest.mark.slow

RUN = [
    *tiny_flags(),
    "--data.seq_len=64",
    "--training.global_batch_size=8",
    "--training.micro_batch_size=2",
    "--training.steps=10",
    "--training.warmup_steps=2",
    "--training.eval_every=0",
    "--metrics.log_every=1",
    "--metrics.progress=false",
    "--checkpoint.interval=0",
    "--checkpoint.keep=0",
]
LOSS_RTOL = 1e-5


def _args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"--data.dir={data_dir}", f"--job.run_dir={run_dir}", *RUN, *extra]


def _run(data_dir: Path, run_dir: Path, nproc: int, *extra: str, code: int = 0) -> str:
    return run_train(nproc, _args(data_dir, run_dir, *extra), code)


def _losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step trained twice (replayed after a restart) must agree with itself."""
    out: dict[int, float] = {}
    for r in records(run_dir):
        assert out.setdefault(r["step"], r["loss"]) == r["loss"], r["step"]
    return out


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted one-process run, with its final checkpoint."""
    run_dir = tmp_path_factory.mktemp("reference")
    _run(data_dir, run_dir, 1)
    return run_dir


# Each segment resumes the previous one's checkpoint under another layout: four layout pairs,
# data-parallel degree 4 -> 2 -> 2 -> 1 -> 2.
CHAIN = [
    (4, ["--parallel.dp_shard=4"], 2),
    (4, ["--parallel.tp=2", "--parallel.dp_shard=2"], 4),
    (4, ["--parallel.pp=2", "--parallel.dp_shard=2"], 6),
    (1, [], 8),
    (2, ["--parallel.dp_replicate=2"], 10),
]


def test_resume_into_other_layouts(data_dir: Path, tmp_path: Path, reference: Path) -> None:
    """Model and optimizer state reshard through DCP; the loader continues at the same global
    batch whatever the data-parallel degree, so every sample is trained on exactly once."""
    for nproc, layout, stop in CHAIN:
        out = _run(
            data_dir,
            tmp_path,
            nproc,
            *layout,
            f"--training.stop_at_step={stop}",
            "--debug.record_samples=true",
        )
        if stop > 2:
            assert f"at step {stop - 2}" in out  # resumed from the previous segment
    got, want = _losses(tmp_path), _losses(reference)
    assert sorted(got) == list(range(1, 11))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=LOSS_RTOL), step
    # Exactly once: each step's union over ranks is one whole global batch, and no sample
    # appears in two steps.
    per_step: dict[int, set[int]] = {}
    for path in (tmp_path / "samples").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            per_step.setdefault(rec["step"], set()).update(rec["samples"])
    assert sorted(per_step) == list(range(1, 11))
    assert all(len(ids) == 8 for ids in per_step.values())
    everything = [i for ids in per_step.values() for i in ids]
    assert len(everything) == len(set(everything)) == 80


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model, _, _ = load_run(run_dir, None, torch.device("cpu"))
    return model.state_dict()


def _workers(launcher: subprocess.Popen) -> list[int]:
    """PIDs of torchrun's worker processes (its children)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    return sorted(int(pid) for pid in children)


SLOW = ["--debug.straggler_rank=0", "--debug.straggler_sleep_s=0.15"]


@pytest.fixture(scope="module")
def uninterrupted_fsdp(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdp")
    _run(data_dir, run_dir, 2, "--parallel.dp_shard=2", "--checkpoint.interval=2")
    return run_dir


@pytest.mark.parametrize("kill_at", [3, 6])
def test_sigkill_restart_resumes_bitwise(
    data_dir: Path, tmp_path: Path, uninterrupted_fsdp: Path, kill_at: int
) -> None:
    """SIGKILL one worker mid-run: torchrun restarts the group, which resumes from the newest
    valid checkpoint; the final weights equal an uninterrupted run's bit for bit."""
    args = _args(data_dir, tmp_path, "--parallel.dp_shard=2", "--checkpoint.interval=2", *SLOW)
    launcher = subprocess.Popen(
        train_command(2, args, restarts=1),
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(tmp_path, kill_at, launcher)
    os.kill(_workers(launcher)[-1], signal.SIGKILL)
    out, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, out[-3000:] + err[-6000:]
    assert "resumed from" in out + err
    want, got = _final_weights(uninterrupted_fsdp), _final_weights(tmp_path)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert _losses(tmp_path) == _losses(uninterrupted_fsdp)


def test_signal_to_one_rank_stops_all_at_one_step(data_dir: Path, tmp_path: Path) -> None:
    """SIGUSR1 to a single worker: every rank stops after the same step, the checkpoint is
    complete, and torchrun exits 0 (so a restart policy does not re-run it)."""
    args = _args(data_dir, tmp_path, "--parallel.dp_shard=2", "--training.steps=40", *SLOW)
    launcher = subprocess.Popen(
        train_command(2, args),
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(tmp_path, 2, launcher)
    os.kill(_workers(launcher)[-1], signal.SIGUSR1)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-4000:]
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert len(saved) == 1 and "SIGUSR1 received" in out
    assert int(saved[0].name.split("-")[1]) == records(tmp_path)[-1]["step"] < 40


def test_nan_on_one_rank_all_ranks_skip_or_abort(data_dir: Path, tmp_path: Path) -> None:
    nan = ["--parallel.dp_shard=2", "--debug.nan_at_step=3", "--debug.nan_rank=1"]
    _run(data_dir, tmp_path / "skip", 2, *nan, "--training.on_nonfinite=skip")
    steps = {r["step"]: r for r in records(tmp_path / "skip")}
    assert steps[3]["skipped"] is True and steps[10]["loss"] is not None
    out = _run(data_dir, tmp_path / "abort", 2, *nan, "--training.on_nonfinite=abort", code=1)
    assert "step 3: non-finite values" in out and "on ranks [1]" in out


def test_background_checkpoints_resume_exactly(
    data_dir: Path, tmp_path: Path, uninterrupted_fsdp: Path
) -> None:
    """checkpoint.async: saves overlap training on their own process group; stopping at step 6
    and resuming from the background-written step-4 or step-6 checkpoint is exact."""
    layout = ["--parallel.dp_shard=2", "--checkpoint.interval=2", "--checkpoint.async=true"]
    _run(data_dir, tmp_path, 2, *layout, "--training.stop_at_step=6")
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in saved] == [f"step-{s:08d}" for s in (2, 4, 6)]
    _run(data_dir, tmp_path, 2, *layout)
    assert _losses(tmp_path) == _losses(uninterrupted_fsdp)
