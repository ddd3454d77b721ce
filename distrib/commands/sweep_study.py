"""The Optuna study a sweep's workers share, and how a worker takes its next trial.

The study lives in the sweep folder as Optuna's journal file (safe for many processes and, with
its open-lock, for many machines on a shared filesystem), or in any database Optuna takes
(`[sweep] storage = "postgresql://..."`). Taking a trial is done under a file lock in the sweep
folder, so that the budget is never exceeded by workers asking at the same moment and an
abandoned trial is finished by exactly one worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState

from distrib.commands.sweep_space import SweepSpace

STUDY_NAME = "distrib-sweep"
JOURNAL = "study.journal"
LOCK = "sweep.lock"
HEARTBEAT = "heartbeat.json"
# A trial whose worker (on another machine) has not touched its heartbeat for this long is taken
# to be abandoned. Workers touch it at every poll (twice a second).
STALE_S = 120.0


def trial_dir(sweep_dir: Path, number: int) -> Path:
    """The run folder of trial `number` (its `job.run_dir`)."""
    return sweep_dir / "trials" / f"trial-{number:04d}"


def _storage(space: SweepSpace, sweep_dir: Path) -> optuna.storages.BaseStorage | str:
    if space.storage:
        return space.storage  # an RDB URL: Optuna opens it
    path = str(sweep_dir / JOURNAL)
    # The open-lock (O_EXCL file creation) also works on NFS, where fcntl locks may not.
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def _sampler(space: SweepSpace, seed: int) -> optuna.samplers.BaseSampler:
    if space.sampler == "grid":
        grid = {p.key: p.grid() for p in space.params}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if space.sampler == "cmaes":
        # CMA-ES searches continuous and integer keys; categorical ones fall back to random.
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(space: SweepSpace) -> optuna.pruners.BasePruner:
    options = space.pruner_options
    if space.pruner == "median":
        return optuna.pruners.MedianPruner(**options)
    if space.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**options)
    if space.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(**options)
    return optuna.pruners.NopPruner()


def open_study(space: SweepSpace, sweep_dir: Path) -> optuna.Study:
    """The sweep's study, created on first use."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        storage=_storage(space, sweep_dir),
        sampler=_sampler(space, space.seed),
        pruner=_pruner(space),
        study_name=STUDY_NAME,
        direction=space.direction,
        load_if_exists=True,
    )


def has_study(space: SweepSpace, sweep_dir: Path) -> bool:
    """Whether the sweep's storage already holds its study (a sweep to resume, not start)."""
    if not space.storage and not (sweep_dir / JOURNAL).exists():
        return False
    names = optuna.get_all_study_names(storage=_storage(space, sweep_dir))
    return STUDY_NAME in names


def budget(space: SweepSpace) -> int:
    """How many trials the sweep runs: `trials`, or the grid's size if that is smaller."""
    return min(space.trials, space.grid_size()) if space.sampler == "grid" else space.trials


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """One worker at a time takes a trial (POSIX record lock: honoured over NFS with lockd)."""
    with open(sweep_dir / LOCK, "a+") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


@dataclass
class Worker:
    """Who runs a trial: written to its heartbeat file, touched while it runs."""

    host: str
    pid: int
    slurm_job: str = ""

    @classmethod
    def me(cls) -> Worker:
        job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID", "")
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return cls(socket.gethostname(), os.getpid(), f"{job}_{task}" if task else job)

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return f"{self.host} pid {self.pid}{job}"


def beat(run_dir: Path, worker: Worker) -> None:
    """Write (or refresh) the trial's heartbeat."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / HEARTBEAT
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(worker.__dict__) + "\n", encoding="utf-8")
    tmp.replace(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def abandoned(run_dir: Path, now: float | None = None) -> bool:
    """Whether nobody runs this trial any more: its worker's process is gone (same machine) or
    its heartbeat is older than `STALE_S` (another machine)."""
    path = run_dir / HEARTBEAT
    try:
        who: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        age = (now or time.time()) - path.stat().st_mtime
    except (OSError, ValueError):
        return True  # asked but never started: its worker died at once
    if who.get("host") == socket.gethostname():
        return not _alive(int(who["pid"]))
    return age > STALE_S


@dataclass
class Assignment:
    """What a worker runs next: a new trial, or a running one to finish (`resumed`)."""

    trial: optuna.Trial
    resumed: bool


def take_trial(
    study: optuna.Study, space: SweepSpace, sweep_dir: Path, worker: Worker
) -> Assignment | None:
    """The next trial for `worker`, or None when the budget is spent. An abandoned running
    trial (its worker killed or preempted) comes first: it is finished, from its checkpoint,
    rather than started again."""
    with sweep_lock(sweep_dir):
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if t.state == TrialState.RUNNING and abandoned(trial_dir(sweep_dir, t.number)):
                beat(trial_dir(sweep_dir, t.number), worker)
                return Assignment(optuna.Trial(study, t._trial_id), resumed=True)
        if len(trials) >= budget(space):
            return None
        # A sampler seeded per trial: one seeded per worker would hand every worker the same
        # values. Trial n's values depend on the seed, n and the trials before it, not on which
        # worker asks.
        study.sampler = _sampler(space, space.seed + len(trials))
        trial = study.ask()
        beat(trial_dir(sweep_dir, trial.number), worker)
        return Assignment(trial, resumed=False)
