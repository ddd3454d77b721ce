"""`distrib sweep`: a hyper-parameter search whose trials are real training runs.

Optuna does the searching (samplers, pruners, the shared study); this module starts the workers
that run trials, here as processes or on Slurm as a job array (sweep_slurm.py), and resumes an
interrupted sweep. Each worker takes trials until the budget is spent (sweep_study.take_trial),
so workers never run a trial twice, and a trial whose worker died is finished by the next one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from optuna.trial import TrialState

from distrib.commands.sweep_folder import SweepSetup, load_setup, new_setup
from distrib.commands.sweep_space import check_keys, load_space
from distrib.commands.sweep_study import Worker, budget, has_study, open_study, take_trial
from distrib.commands.sweep_trial import TrialRun, die_with_parent
from distrib.errors import ConfigError, UserError


def _check_training(setup: SweepSetup) -> None:
    """What every trial needs, checked once before any starts."""
    from distrib.config import load_config
    from distrib.train.trainer import check_dataset

    space = setup.space
    check_keys(space, setup.config, setup.overrides)
    cfg = load_config(setup.config, setup.overrides)
    if space.metric.startswith("val_") and cfg.training.eval_every <= 0:
        raise ConfigError(
            f"{space.path}: sweep.metric = '{space.metric}' needs validation during training: "
            "set training.eval_every > 0 (in the config or as an override)"
        )
    check_dataset(cfg.data, cfg.model)


def prepare_sweep(
    config: Path | None,
    space_path: Path | None,
    overrides: list[str],
    sweep_dir: Path | None,
    resume: bool,
) -> SweepSetup:
    """The setup of a new sweep (checked, written to its folder), or of the one to resume."""
    if resume:
        if sweep_dir is None:
            if space_path is None:
                raise UserError("distrib sweep --resume needs --dir DIR (or the --space file)")
            sweep_dir = Path(load_space(space_path).dir or f"runs/sweep-{space_path.stem}")
        return load_setup(sweep_dir)
    if space_path is None:
        raise UserError("distrib sweep needs --space FILE (the keys to search; see docs/sweeps.md)")
    space = load_space(space_path)
    sweep_dir = sweep_dir or Path(space.dir or f"runs/sweep-{space_path.stem}")
    setup = new_setup(sweep_dir, config, [*space.overrides, *overrides], space)
    if (sweep_dir / "sweep.json").exists() or has_study(space, setup.sweep_dir):
        raise UserError(
            f"{sweep_dir} already holds a sweep: continue it with distrib sweep --resume "
            f"--dir {sweep_dir}, or choose another folder (--dir, or [sweep] dir)"
        )
    _check_training(setup)
    setup.save()
    return setup


def run_sweep(setup: SweepSetup) -> int:
    """Run the sweep's workers to the end of the budget; report; returns the exit code."""
    space = setup.space
    study = open_study(space, setup.sweep_dir)
    done = len(study.trials)
    print(
        f"sweep {setup.sweep_dir}: {budget(space)} trials ({done} already started), "
        f"{space.workers} {space.launcher} worker(s), {space.sampler} sampler, {space.pruner} pruner, "
        f"{space.goal} {space.metric} ({space.direction})",
        flush=True,
    )
    if space.launcher == "slurm":
        from distrib.commands.sweep_slurm import run_on_slurm

        code = run_on_slurm(setup, study)
    else:
        code = _run_local(setup)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.RUNNING]
    if code == 0 and len(finished) < budget(space):
        print(
            f"the workers ended with {len(finished)} of {budget(space)} trials finished (see "
            f"their output); distrib sweep --resume --dir {setup.sweep_dir} continues",
            flush=True,
        )
        code = 1
    if code == 0:
        from distrib.commands.sweep_report import write_sweep_report

        paths = write_sweep_report(setup.sweep_dir)
        print(paths[0].read_text(encoding="utf-8"), end="", flush=True)
    return code


def _devices(worker: int, nproc: int) -> dict[str, str]:
    """A worker's own GPUs on a machine with several: worker i gets nproc of them."""
    import torch

    if not torch.cuda.is_available():
        return {}
    first = worker * nproc
    if first + nproc > torch.cuda.device_count():
        raise UserError(
            f"sweep.workers x sweep.nproc needs {first + nproc} GPUs; this machine has "
            f"{torch.cuda.device_count()}"
        )
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(first + i) for i in range(nproc))}


def _run_local(setup: SweepSetup) -> int:
    """`workers` worker processes on this machine; Ctrl-C stops each trial at a checkpoint."""
    command = [sys.executable, "-m", "distrib.cli", "sweep", "worker", str(setup.sweep_dir)]
    procs = [
        subprocess.Popen(
            command,
            env={**os.environ, **_devices(i, setup.space.nproc)},
            preexec_fn=die_with_parent,
        )
        for i in range(setup.space.workers)
    ]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        # The workers got the same Ctrl-C (one process group): they stop their trials cleanly.
        for p in procs:
            p.wait()
        print(
            f"interrupted: distrib sweep --resume --dir {setup.sweep_dir} continues it", flush=True
        )
        return 130
    failed = [c for c in codes if c != 0]
    return failed[0] if failed else 0


def run_worker(sweep_dir: Path) -> int:
    """`distrib sweep worker DIR`: take trials and run them until the budget is spent."""
    setup = load_setup(sweep_dir)
    study = open_study(setup.space, setup.sweep_dir)
    worker = Worker.me()
    stop: list[int] = []

    def _stop(signum: int, frame: object) -> None:
        stop.append(signum)  # the running trial is stopped at a checkpoint by TrialRun

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _stop)
    while not stop:
        assignment = take_trial(study, setup.space, setup.sweep_dir, worker)
        if assignment is None:
            break
        run = TrialRun(setup, study, assignment, worker, interrupted=lambda: bool(stop))
        verb = "resumes" if assignment.resumed else "starts"
        print(
            f"trial {assignment.trial.number} {verb} on {worker.describe()}: {run.run_dir}",
            flush=True,
        )
        print(run.run(), flush=True)
    return 0
