"""A sweep's workers as a Slurm job array: each array task is one `distrib sweep worker`, which
takes trials from the shared study until the budget is spent, running each on its node (torchrun
for several processes). The sweep folder must be on a filesystem every node sees.

Written by hand rather than with submitit: a worker is a command line, not a pickled function,
so a batch script is all it takes, and the user can read and resubmit it (`sbatch <dir>/slurm/
worker.sbatch`).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

from distrib.commands.sweep_folder import SweepSetup
from distrib.errors import UserError

POLL_S = 2.0
# Before its time limit, the batch shell gets USR1: the worker stops its trial at a checkpoint
# and the trial is finished by a later worker (or `distrib sweep --resume`).
GRACE_S = 180


def batch_script(setup: SweepSetup) -> str:
    """The worker job array's batch script."""
    space, out = setup.space, setup.sweep_dir / "slurm"
    lines = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name=sweep-{setup.sweep_dir.name}",
        f"#SBATCH --array=0-{space.workers - 1}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --signal=B:USR1@{GRACE_S}",
        f"#SBATCH --output={out}/worker-%A_%a.out",
        f"#SBATCH --chdir={setup.cwd}",
    ]
    options = {k: v for k, v in space.slurm.items() if k != "extra"}
    names = {"gpus_per_node": "gpus-per-node", "cpus_per_task": "cpus-per-task"}
    lines += [f"#SBATCH --{names.get(k, k)}={v}" for k, v in options.items()]
    lines += [f"#SBATCH {arg}" for arg in space.slurm.get("extra", [])]
    python = shlex.quote(sys.executable)
    # `exec` would not do: the shell must stay to pass USR1 on to the worker (bash runs traps
    # only between commands, hence `wait`).
    lines += [
        f"{python} -m distrib.cli sweep worker {shlex.quote(str(setup.sweep_dir))} &",
        "WORKER=$!",
        "trap 'kill -USR1 $WORKER' USR1 TERM",
        "wait $WORKER || wait $WORKER",
        "",
    ]
    return "\n".join(lines)


def _slurm(*cmd: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError:
        raise UserError(f"sweep.launcher = 'slurm' but {cmd[0]} is not on PATH") from None
    if done.returncode != 0:
        raise UserError(f"{' '.join(cmd)} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def submit(setup: SweepSetup) -> str:
    """Write and submit the worker array; returns the job id."""
    folder = setup.sweep_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "worker.sbatch"
    script.write_text(batch_script(setup), encoding="utf-8")
    return _slurm("sbatch", "--parsable", str(script)).strip().split(";")[0]


def _queued(job: str) -> bool:
    return bool(_slurm("squeue", "--noheader", "--array", "--jobs", job).strip())


def run_on_slurm(setup: SweepSetup, study: optuna.Study) -> int:
    """Submit the workers and follow the study until they have all ended."""
    job = submit(setup)
    print(
        f"submitted worker array {job} ({setup.space.workers} tasks); logs in {setup.sweep_dir / 'slurm'}",
        flush=True,
    )
    seen: set[int] = set()
    try:
        while True:
            queued = _queued(job)
            for t in study.get_trials(deepcopy=False):
                if t.state != TrialState.RUNNING and t.number not in seen:
                    seen.add(t.number)
                    print(
                        f"trial {t.number}: {t.user_attrs.get('outcome', t.state.name.lower())}",
                        flush=True,
                    )
            if not queued:
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        print(
            f"stopped following; the worker jobs go on (scancel {job} stops them). "
            f"distrib sweep --resume --dir {setup.sweep_dir} follows a new array",
            flush=True,
        )
        return 130
    return 0
