"""`distrib sweep` end to end on the tiny model: real trials under local workers, pruned by
successive halving, reported, the best config trained; then a sweep interrupted by Ctrl-C and
killed outright, resumed each time, that finishes its budget without repeating a trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from distrib.commands.sweep_study import trial_dir
from distrib.commands.sweep_trial import metric_by_step
from tests.support.runs import child_env, records, run_train
from tests.support.sweeps import sweep_command, tiny_sweep_flags, trials, write_space

pytestmark = pytest.mark.slow

# A slow rank 0 (sleeping each step) keeps the trials running long enough for the pruner and
# the test to act between steps.
SLOW = {"debug.straggler_rank": 0, "debug.straggler_sleep_s": 0.1}


def _sweep(cwd: Path, *args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        sweep_command(*args),
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_pruned_sweep_reports_and_its_best_config_trains(data_dir: Path, tmp_path: Path) -> None:
    space = write_space(
        tmp_path / "space.toml",
        {"trials": 8, "workers": 2, "sampler": "random", "pruner": "successive_halving", "seed": 5},
        {"training.steps": 24, "training.eval_every": 3, "checkpoint.interval": 12, **SLOW},
        {"min_resource": 3, "reduction_factor": 2},
    )
    done = _sweep(tmp_path, "--space", space, "--dir", "sw", *tiny_sweep_flags(data_dir))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep_dir = tmp_path / "sw"
    found = trials(sweep_dir)
    assert [t.number for t in found] == list(range(8))
    states = [t.state for t in found]
    assert TrialState.RUNNING not in states and TrialState.FAIL not in states
    pruned = [t for t in found if t.state == TrialState.PRUNED]
    assert pruned, "successive halving pruned no trial"
    assert len({tuple(sorted(t.params.items())) for t in found}) == 8  # no two trials alike
    for t in found:
        run_dir = trial_dir(sweep_dir, t.number)
        steps = [r["step"] for r in records(run_dir)]
        assert len(steps) == len(set(steps)), f"trial {t.number} trained a step twice"
        outcome = json.loads((run_dir / "sweep.json").read_text())
        assert outcome["state"] == t.state.name.lower()
        if t.state == TrialState.COMPLETE:  # the objective: the final validation loss
            values = metric_by_step(run_dir, "val_loss")
            assert t.value == values[24] and max(values) == 24
    for t in pruned:  # stopped early, at a checkpoint of the step it stopped at, with why
        run_dir = trial_dir(sweep_dir, t.number)
        saved = sorted((run_dir / "checkpoints").glob("step-*"))
        stopped = int(saved[-1].name.split("-")[1])
        assert stopped < 24 and "SIGUSR1 received" in (run_dir / "train.log").read_text()
        assert "pruned by the successive_halving pruner" in t.user_attrs["outcome"]
    report = sweep_dir / "report"
    summary = (report / "summary.md").read_text()
    assert f"{len(pruned)} pruned" in summary and "| pruned |" in summary
    for chart in ("history", "intermediate", "parallel_coordinate", "importances"):
        assert (report / f"{chart}.png").stat().st_size > 10_000, chart
    assert "best.toml" in done.stdout
    best = min((t for t in found if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    run_train(1, ["--config", str(sweep_dir / "best.toml")])
    assert records(sweep_dir / "best")[-1]["step"] == 24
    assert (sweep_dir / "best" / "config.json").is_file()
    trained = json.loads((sweep_dir / "best" / "config.json").read_text())
    assert trained["training"]["lr"] == best.params["training.lr"]


def _wait(sweep_dir: Path, proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the sweep ended before {what}: {proc.communicate()}"
        if (sweep_dir / "sweep.json").exists() and ready(trials(sweep_dir)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout} s")


def _running_at(sweep_dir: Path, step: int):
    """A test that some trial is running and has logged `step`."""

    def ready(found) -> bool:
        running = [t for t in found if t.state == TrialState.RUNNING]
        return any(
            max(metric_by_step(trial_dir(sweep_dir, t.number), "step") or {0: 0}) >= step
            for t in running
        )

    return ready


def _start(tmp_path: Path, *args: str | Path) -> subprocess.Popen:
    # A session of its own: the test signals the sweep's whole process group, as a terminal's
    # Ctrl-C or a preemption would.
    return subprocess.Popen(
        sweep_command(*args),
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_an_interrupted_sweep_resumes_without_repeating_trials(
    data_dir: Path, tmp_path: Path
) -> None:
    """Two-process trials (torchrun, FSDP over 2 ranks), one worker. Ctrl-C: the running trial
    stops at a checkpoint and the sweep exits 130. Resumed, then SIGKILL to every process:
    nothing stops cleanly. Resumed again: the budget completes; each interrupted trial
    continued from its checkpoint, and no finished trial ran again."""
    space = write_space(
        tmp_path / "space.toml",
        {"trials": 4, "workers": 1, "nproc": 2, "sampler": "random", "metric": "loss"},
        {
            "training.steps": 16,
            "training.eval_every": 0,
            "checkpoint.interval": 4,
            "parallel.dp_shard": 2,
            "metrics.log_every": 1,
            **SLOW,
        },
    )
    sweep_dir = tmp_path / "sw"
    flags = tiny_sweep_flags(data_dir)
    first = _start(tmp_path, "--space", space, "--dir", "sw", *flags)
    _wait(sweep_dir, first, _running_at(sweep_dir, 2), "a trial at step 2")
    os.killpg(first.pid, signal.SIGINT)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 130, out[-3000:]
    assert "distrib sweep --resume --dir" in out
    (interrupted,) = [t for t in trials(sweep_dir) if t.state == TrialState.RUNNING]
    log = (trial_dir(sweep_dir, interrupted.number) / "train.log").read_text()
    assert "received: checkpoint" in log

    second = _start(tmp_path, "--resume", "--dir", "sw")
    _wait(
        sweep_dir,
        second,
        lambda found: len(found) >= 2 and _running_at(sweep_dir, 6)(found),
        "a second trial at step 6",
    )
    os.killpg(second.pid, signal.SIGKILL)
    second.wait(timeout=60)
    killed = [t.number for t in trials(sweep_dir) if t.state == TrialState.RUNNING]
    finished_before = {
        t.number: (trial_dir(sweep_dir, t.number) / "run.json").read_text()
        for t in trials(sweep_dir)
        if t.state == TrialState.COMPLETE
    }
    assert interrupted.number in finished_before and len(killed) == 1
    time.sleep(1)  # the killed processes' PIDs are gone: the trial is abandoned

    third = _sweep(tmp_path, "--resume", "--dir", "sw")
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert f"trial {killed[0]} resumes" in third.stdout
    found = trials(sweep_dir)
    assert [t.state for t in found] == [TrialState.COMPLETE] * 4
    for number, identity in finished_before.items():  # not run again
        assert (trial_dir(sweep_dir, number) / "run.json").read_text() == identity
    for number in (interrupted.number, killed[0]):
        log = (trial_dir(sweep_dir, number) / "train.log").read_text()
        assert "resumed from" in log, number
    for t in found:
        steps = [r["step"] for r in records(trial_dir(sweep_dir, t.number))]
        assert sorted(set(steps)) == list(range(1, 17)), t.number
