"""One trial: a real `distrib train` run in its own folder, watched while it trains.

The worker reads the run's metrics.jsonl as it grows, reports the sweep's metric to Optuna at
each logged step, and asks the pruner; a pruned run is sent SIGUSR1, which makes the trainer
finish its step, write a checkpoint and exit 0 (train/signals.py), so the trial can be resumed
by hand later (`distrib train --config <trial>/config.toml`). The outcome is told to the study
and written to `<trial>/sweep.json`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.trial import TrialState

from distrib.commands.sweep_folder import SweepSetup, write_config
from distrib.commands.sweep_space import Param
from distrib.commands.sweep_study import Assignment, Worker, beat, trial_dir
from distrib.errors import UserError

POLL_S = 0.5
OUTCOME = "sweep.json"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child, before exec: SIGTERM when the parent dies, so a killed worker never leaves
    its training run behind (the trainer takes SIGTERM as a stop: it checkpoints, then exits).
    Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def suggest(trial: optuna.Trial, param: Param) -> Any:
    """The trial's value for one searched key."""
    if param.type == "categorical":
        return trial.suggest_categorical(param.key, param.choices)
    if param.type == "int":
        return trial.suggest_int(param.key, int(param.low), int(param.high), step=int(param.step))
    log = param.type == "log_uniform"
    return trial.suggest_float(
        param.key, float(param.low), float(param.high), step=param.step, log=log
    )


def train_command(nproc: int, config: Path) -> list[str]:
    """`distrib train --config CONFIG`, under `torchrun --standalone` for several processes
    (its own free port, so trials on one machine do not meet)."""
    train = ["-m", "distrib.cli", "train", "--config", str(config)]
    if nproc == 1:
        return [sys.executable, *train]
    run = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable, *run, *train]


class MetricsTail:
    """step -> a metric's value in a run's metrics.jsonl, read incrementally as it grows (a long
    run's file is tens of megabytes; the worker polls twice a second). Whole lines only: the run
    may be writing. A resumed run's record of a step replaces the earlier one."""

    def __init__(self, run_dir: Path, metric: str) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.metric = metric
        self.values: dict[int, float] = {}
        self._offset = 0

    def read(self) -> dict[int, float]:
        if not self.path.exists():
            return self.values
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        whole = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(whole)
        for line in whole.decode("utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            value = rec.get(self.metric)
            if isinstance(value, int | float) and math.isfinite(value):
                self.values[int(rec["step"])] = float(value)
        return self.values


def metric_by_step(run_dir: Path, metric: str) -> dict[int, float]:
    """step -> the metric's value in the run's metrics.jsonl, as it is now."""
    return MetricsTail(run_dir, metric).read()


def trained_steps(run_dir: Path) -> int:
    """The steps the run has trained: its newest logged step or checkpoint, whichever is later
    (a run stopped between logged steps checkpoints the step it stopped at)."""
    from distrib.checkpoint import list_checkpoints

    logged = max(metric_by_step(run_dir, "step") or {0: 0.0})
    saved = list_checkpoints(run_dir / "checkpoints")
    return max(logged, int(saved[-1].name.split("-")[1]) if saved else 0)


def _stop(proc: subprocess.Popen) -> None:
    """SIGUSR1 to the training processes: torchrun's workers, or the one process itself."""
    try:
        workers = psutil.Process(proc.pid).children() or [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for w in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            w.send_signal(signal.SIGUSR1)


@dataclass
class TrialRun:
    """Runs one assigned trial to its end: complete, pruned, failed, or interrupted."""

    setup: SweepSetup
    study: optuna.Study
    assignment: Assignment
    worker: Worker
    interrupted: Callable[[], bool]
    reported: set[int] = field(default_factory=set)
    total: int = 0  # the steps the run trains
    tail: MetricsTail | None = None

    @property
    def trial(self) -> optuna.Trial:
        return self.assignment.trial

    @property
    def run_dir(self) -> Path:
        return trial_dir(self.setup.sweep_dir, self.trial.number)

    def params(self) -> dict[str, Any]:
        if self.assignment.resumed:
            return dict(self.trial.params)
        return {p.key: suggest(self.trial, p) for p in self.setup.space.params}

    def run(self) -> str:
        """Train, watch, tell the study; returns the one-line outcome."""
        params = self.params()
        self.trial.set_user_attr("run_dir", str(self.run_dir))
        try:
            config = write_config(
                self.run_dir / "config.toml",
                self.setup,
                params,
                self.run_dir,
                f"sweep {self.setup.sweep_dir.name} trial {self.trial.number}",
            )
        except UserError as err:  # values each valid alone, refused together (checked: sweep.py)
            why = f"its config is invalid: {err}"
            self._tell(TrialState.FAIL, None, why, 0)
            return f"trial {self.trial.number}: failed: {why}"
        self.total = self._total_steps()
        frozen = self.study.get_trials(deepcopy=False)[self.trial.number]
        self.reported = set(frozen.intermediate_values)
        self.tail = MetricsTail(self.run_dir, self.setup.space.metric)
        with open(self.run_dir / "train.log", "a", encoding="utf-8") as log:
            proc = subprocess.Popen(
                train_command(self.setup.space.nproc, config),
                cwd=self.setup.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
            pruned_at = self._watch(proc)
        return self._finish(proc.returncode, pruned_at)

    def _watch(self, proc: subprocess.Popen) -> int | None:
        """Until the run exits: heartbeat, report, prune. Returns the step pruned at, if any."""
        pruned_at: int | None = None
        stopping = False
        while proc.poll() is None:
            beat(self.run_dir, self.worker)
            if pruned_at is None and not stopping:
                pruned_at = self._report()
                if pruned_at is not None or self.interrupted():
                    _stop(proc)
                    stopping = True
            time.sleep(POLL_S)
        if pruned_at is None and not self.interrupted():
            self._report(prune=False)  # the values logged after the last poll
        return pruned_at

    def _report(self, prune: bool = True) -> int | None:
        assert self.tail is not None
        values = self.tail.read()
        for step in sorted(set(values) - self.reported):
            self.trial.report(values[step], step)
            self.reported.add(step)
            # Pruning at the last step saves nothing: the run has finished; it completes.
            if prune and step < self.total and self.trial.should_prune():
                return step
        return None

    def _finish(self, code: int, pruned_at: int | None) -> str:
        space = self.setup.space
        values = metric_by_step(self.run_dir, space.metric)
        steps, done = trained_steps(self.run_dir), self.total
        head = f"trial {self.trial.number}"
        if pruned_at is not None:
            value = values[pruned_at]
            why = f"pruned by the {space.pruner} pruner at step {pruned_at} ({space.metric} {value:.4g})"
            self._tell(TrialState.PRUNED, None, why, steps, shown=value)
            return f"{head}: {why}; checkpoint at step {steps}"
        if code == 0 and steps >= done:
            if not values:
                why = f"{space.metric} was never logged (set training.eval_every for val_* metrics)"
                self._tell(TrialState.FAIL, None, why, steps)
                return f"{head}: failed: {why}"
            pick = min if space.direction == "minimize" else max
            value = values[max(values)] if space.goal == "final" else pick(values.values())
            why = f"completed {steps} steps: {space.goal} {space.metric} {value:.4g}"
            self._tell(TrialState.COMPLETE, value, why, steps)
            return f"{head}: {why}"
        if self.interrupted() or (code == 0 and steps < done):
            why = f"interrupted at step {steps} (exit {code}); distrib sweep --resume finishes it"
            self._record("running", None, why, steps)
            return f"{head}: {why}"
        tail = (self.run_dir / "train.log").read_text(encoding="utf-8").splitlines()[-15:]
        why = f"training exited with code {code} at step {steps}; see {self.run_dir / 'train.log'}"
        self._tell(TrialState.FAIL, None, why, steps)
        return f"{head}: failed: {why}\n" + "\n".join(f"    {line}" for line in tail)

    def _total_steps(self) -> int:
        from distrib.config import load_config

        cfg = load_config(self.run_dir / "config.toml")
        t = cfg.training
        return min(t.steps, t.stop_at_step) if t.stop_at_step else t.steps

    def _tell(
        self,
        state: TrialState,
        value: float | None,
        why: str,
        steps: int,
        shown: float | None = None,
    ) -> None:
        self.trial.set_user_attr("outcome", why)
        self.trial.set_user_attr("steps", steps)
        self.study.tell(self.trial, value, state=state)
        self._record(state.name.lower(), value if shown is None else shown, why, steps)

    def _record(self, state: str, value: float | None, why: str, steps: int) -> None:
        doc = {
            "trial": self.trial.number,
            "state": state,
            "value": value,
            "steps": steps,
            "why": why,
            "params": dict(self.trial.params),
            "worker": self.worker.describe(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        path = self.run_dir / OUTCOME
        path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
