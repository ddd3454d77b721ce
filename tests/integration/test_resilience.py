"""One process: NaN handling in each `training.on_nonfinite` mode, and stop signals."""

from __future__ import annotations

import math
import signal
import subprocess
import time
from pathlib import Path

import pytest

from distrib import checkpoint as ckpt
from tests.integration.conftest import TINY_RUN, train
from tests.support.runs import ROOT, child_env, records, train_command, wait_for_step


def test_nan_skip_drops_the_update_and_goes_on(data_dir: Path, tmp_path: Path, capsys) -> None:
    code = train(data_dir, tmp_path, "--debug.nan_at_step=3", "--training.on_nonfinite=skip")
    assert code == 0
    by_step = {r["step"]: r for r in records(tmp_path)}
    assert by_step[3]["skipped"] is True and by_step[3]["loss"] is None  # NaN is written as null
    assert all(math.isfinite(by_step[s]["loss"]) for s in (1, 2, 4, 8))
    assert "skipped" not in by_step[4]
    out = capsys.readouterr().out
    assert "step 3: non-finite values" in out and "on ranks [0]" in out and "update skipped" in out


def test_nan_abort_names_step_and_rank(data_dir: Path, tmp_path: Path, capsys) -> None:
    code = train(data_dir, tmp_path, "--debug.nan_at_step=3", "--training.on_nonfinite=abort")
    assert code == 2
    err = capsys.readouterr().err
    assert "step 3: non-finite values" in err and "on ranks [0]" in err and "abort" in err
    assert [r["step"] for r in records(tmp_path)] == [1, 2]


def test_nan_rollback_reloads_and_passes_over_the_batch(
    data_dir: Path, tmp_path: Path, capsys
) -> None:
    code = train(
        data_dir,
        tmp_path,
        "--debug.nan_at_step=6",
        "--training.on_nonfinite=rollback",
        "--checkpoint.interval=4",
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "step 6: non-finite values" in out and "rolled back to" in out
    assert "step 6: batch passed over" in out
    recs = records(tmp_path)
    # Step 5 ran twice (before and after the rollback) with identical results: the replay from
    # the step-4 checkpoint is exact.
    fives = [r for r in recs if r["step"] == 5]
    assert len(fives) == 2 and fives[0]["loss"] == fives[1]["loss"]
    assert recs[-1]["step"] == 8 and math.isfinite(recs[-1]["loss"])
    # A resumed run knows which batch to pass over.
    final = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    state = {"skip_steps": []}
    ckpt.load(final, state)
    assert state["skip_steps"] == [6]


def test_rollback_with_no_checkpoint_is_a_clear_error(
    data_dir: Path, tmp_path: Path, capsys
) -> None:
    code = train(data_dir, tmp_path, "--debug.nan_at_step=2", "--training.on_nonfinite=rollback")
    assert code == 2
    assert "holds no checkpoint to roll back to" in capsys.readouterr().err


def _start(run_dir: Path, data_dir: Path, *extra: str) -> subprocess.Popen:
    args = [
        f"--data.dir={data_dir}",
        f"--job.run_dir={run_dir}",
        *TINY_RUN,
        "--training.steps=30",
        "--checkpoint.interval=0",
        *extra,
    ]
    return subprocess.Popen(
        train_command(1, args),
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # SIGUSR1: distributed/
def test_stop_signal_checkpoints_and_exits_cleanly(
    data_dir: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """The signal is caught, the current step finishes and is saved, the process exits 0; the
    resumed run ends exactly where an uninterrupted one does."""
    slow = ["--debug.straggler_rank=0", "--debug.straggler_sleep_s=0.1"]
    proc = _start(tmp_path / "run", data_dir, *slow)
    wait_for_step(tmp_path / "run", 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    saved = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(saved) == 1
    stopped_at = int(saved[0].name.split("-")[1])
    assert 3 <= stopped_at < 30
    assert f"{sig.name} received" in out
    resumed = _start(tmp_path / "run", data_dir)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from {saved[0]} at step {stopped_at}" in out
    whole = _start(tmp_path / "whole", data_dir)
    whole.communicate(timeout=300)
    want = {r["step"]: r["loss"] for r in records(tmp_path / "whole")}
    got = {r["step"]: r["loss"] for r in records(tmp_path / "run")}
    assert got == want


def test_second_ctrl_c_stops_at_once_without_a_traceback(data_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C checkpoints at the next step like SIGTERM; a second one does not wait for it."""
    slow = ["--debug.straggler_rank=0", "--debug.straggler_sleep_s=0.5"]
    proc = _start(tmp_path / "run", data_dir, *slow)
    wait_for_step(tmp_path / "run", 1, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # two signals before Python runs its handler would count as one
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "distrib train: interrupted" in err and "Traceback" not in err
